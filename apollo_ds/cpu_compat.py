"""Small compatibility layer for running DeepSpeed and megatron-core on machines without CUDA.

Active when CUDA is absent, or when ``DS_ACCELERATOR=cpu`` asks for the CPU explicitly (the
test suite does, so it runs the same way on a GPU box); otherwise ``apply()`` changes nothing.
The model uses megatron-core's Column/Row/VocabParallel layers and vocab-parallel cross
entropy, which run on CPU unchanged; what needs help is DeepSpeed's first
``init_distributed``, which JIT-compiles a shared-memory comm op (1-2 minutes on 2 cores) used
only for inference all-reduce, and megatron-core's CUDA RNG helpers (the model-parallel RNG
tracker, activation recompute) that it calls unconditionally.
"""
from __future__ import annotations

import importlib
import os

import torch

_applied = False


def wants_cpu() -> bool:
    """The one place that decides the accelerator: CUDA whenever it works, unless the CPU was
    asked for with DS_ACCELERATOR=cpu."""
    return not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"


def apply() -> bool:
    """Patch once; returns True when running on CPU."""
    global _applied
    if not wants_cpu():
        return False
    if _applied:
        return True
    os.environ["DS_ACCELERATOR"] = "cpu"
    # Skip the shm comm op build: inference-only, and compiling it costs minutes per machine.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    # megatron-core's RNG tracker and recompute read/write the CUDA generator; map it to the
    # CPU one (with the shim, the tracker's "cuda" states are CPU generator states).
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.random.manual_seed = torch.cuda.manual_seed
    import megatron.core.tensor_parallel.random as mrandom
    mrandom._get_cuda_rng_state = (
        lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state())
    mrandom._set_cuda_rng_state = (
        lambda state, device=-1, graph_safe=False: torch.set_rng_state(state))
    _applied = True
    return True
