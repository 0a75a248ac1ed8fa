#!/usr/bin/env python3
"""Thin entry point for `apollo-ds train-tokenizer` (apollo_ds/data/prep/train_tokenizer.py); same options."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.data.prep.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="train_tokenizer.py"))
