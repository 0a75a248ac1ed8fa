"""apollo_ds: Apollo progressive pretraining of GPT on DeepSpeed and megatron-core."""
__version__ = "0.1.0"
