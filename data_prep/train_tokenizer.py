#!/usr/bin/env python3
"""Thin entry point for `apollo-ds train-tokenizer` (same options); the code is in
apollo_ds/data/prep/train_tokenizer.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.data.prep.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="train_tokenizer.py"))
