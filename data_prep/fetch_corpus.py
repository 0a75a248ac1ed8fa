#!/usr/bin/env python3
"""Thin entry point for `apollo-ds fetch-corpus` (same options); the code is in
apollo_ds/data/prep/fetch_corpus.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.data.prep.fetch_corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="fetch_corpus.py"))
