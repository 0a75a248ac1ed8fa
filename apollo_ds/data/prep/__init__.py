"""The data tools (``apollo-ds preprocess``, ``train-tokenizer``, ``fetch-corpus``)."""
