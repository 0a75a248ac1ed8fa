"""Data for apollo_ds: SentencePiece tokenizer, indexed-dataset checks, megatron-core GPT
datasets and micro-batches. Importing this package does not import torch or megatron."""
from apollo_ds.data.datasets import (build_datasets, check_data_inputs, get_micro_batch,
                                     parse_blend)
from apollo_ds.data.indexed import IndexInfo, check_indexed_dataset
from apollo_ds.data.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "IndexInfo", "check_indexed_dataset",
           "check_data_inputs", "parse_blend", "build_datasets", "get_micro_batch"]
