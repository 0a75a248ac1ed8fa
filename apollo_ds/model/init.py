"""Layout-independent weight initialisation.

Every parameter is drawn as its FULL (unsharded) tensor from a generator seeded by
(seed, parameter name), and each tensor-parallel rank keeps its own slice. So a model has the
same weights at TP=1 and TP=2, whatever vocabulary padding TP needs, and a pool layer created
at any stage gets the same initial values as at any other. GPT-2 scheme: N(0, 0.02), residual
output projections scaled by 1/sqrt(2L), biases zero, LayerNorm weight one.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
from megatron.core import parallel_state


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def full_shape(param: torch.nn.Parameter, tp: int) -> tuple[int, ...]:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return tuple(shape)


def local_slice(full: torch.Tensor, param: torch.nn.Parameter, tp: int, rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    return full.chunk(tp, dim=param.partition_dim)[rank]


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float, n_layers: int,
                 vocab_size: int, gather=None) -> None:
    """``gather(p)``: a context in which a partitioned parameter is whole and whose exit
    keeps what was written (ZeRO-3); None: parameters are whole already."""
    for name, p in model.named_parameters():
        with gather(p) if gather is not None else contextlib.nullcontext():
            _init_one(name, p, seed, std, n_layers, vocab_size)


@torch.no_grad()
def _init_one(name: str, p, seed: int, std: float, n_layers: int, vocab_size: int) -> None:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    leaf = name.rsplit(".", 1)[-1]
    shape = full_shape(p, tp)
    if "norm" in name:
        full = torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    elif leaf == "bias":
        full = torch.zeros(shape)
    else:
        scale = std / math.sqrt(2 * n_layers) if name.endswith(
            ("proj.weight", "fc2.weight")) else std
        rows = shape
        if getattr(p, "vocab_rows", False) or name.endswith("word_embeddings.weight"):
            # Only real vocabulary rows are drawn, so padding (which depends on TP)
            # changes nothing; padded rows stay zero.
            rows = (vocab_size,) + tuple(shape[1:])
        full = torch.zeros(shape)
        full[: rows[0]] = torch.randn(rows, generator=_generator(seed, name)) * scale
    p.copy_(local_slice(full, p, tp, rank).to(p.dtype))
