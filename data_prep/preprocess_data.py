#!/usr/bin/env python3
"""Thin entry point for `apollo-ds preprocess` (same options); the code is in
apollo_ds/data/prep/preprocess.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.data.prep.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="preprocess_data.py"))
