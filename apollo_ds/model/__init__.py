"""GPT-2 architecture on megatron-core tensor-parallel layers, with a pool of unique layers."""
from apollo_ds.model.gpt import PoolGPT, padded_vocab_size
from apollo_ds.model.init import init_weights, full_shape

__all__ = ["PoolGPT", "padded_vocab_size", "init_weights", "full_shape"]
