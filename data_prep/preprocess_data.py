#!/usr/bin/env python3
"""Thin entry point for `apollo-ds preprocess` (apollo_ds/data/prep/preprocess.py); same options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.data.prep.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="preprocess_data.py"))
