"""Start-up cost of a training process. megatron-core (its fused elementwise helpers, through
``megatron.core.jit.jit_fuser``) and DeepSpeed (its Muon optimizer) wrap functions in
``torch.compile`` when they are imported, and the first ``torch.compile`` call imports
TorchInductor: about 1.3 s of CPU per process, a quarter of a worker's start-up, for functions
apollo_ds never calls. ``import_heavy()`` imports both with ``torch.compile`` deferring each
function's compilation to its first call (``torch.compile`` compiles lazily anyway, so a caller
sees the same compiled function); modules (``train.compile``) are compiled as usual, and
``torch.compile`` itself is restored before anything else runs."""
from __future__ import annotations

import functools
import importlib

import torch

HEAVY = ("megatron.core", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer")


def _deferring(real):
    def compile_later(model=None, **options):
        if model is None:                      # used as @torch.compile(...)
            return lambda fn: compile_later(fn, **options)
        if isinstance(model, torch.nn.Module) or not callable(model):
            return real(model, **options)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **options)
            return compiled(*args, **kwargs)
        return call
    return compile_later


def import_heavy() -> None:
    """Import megatron-core and DeepSpeed (a no-op when they are imported already)."""
    real = torch.compile
    torch.compile = _deferring(real)
    try:
        for name in HEAVY:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                if name in ("megatron.core", "deepspeed"):
                    raise          # another DeepSpeed may have no Muon: nothing to defer there
    finally:
        torch.compile = real
