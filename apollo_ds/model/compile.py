"""``train.compile``: torch.compile per transformer block, never the whole model.

The whole model cannot be one graph: its layer map (which pool layer runs at which position,
and how many positions) changes every micro-batch. A block's own computation has a fixed shape
for the whole run, so one compiled function per block class, ``(layer, x) -> cls.forward(layer,
x)``, serves every pool layer and every position: the layer is an argument (its parameters
become graph inputs), so a new pool layer after an expansion, or another position, reuses the
same compiled code. Compilation happens again only for what really differs: a new activation
shape, training vs evaluation (autograd on or off) and recompute's backward re-run.

megatron-core's row-parallel linear asks for the default TP group inside its forward (a
function torch.compile does not trace), so each block compiles as three graphs split at the
attention output and fc2 projections; the fused elementwise work (norms, GeLU/SwiGLU, rotary,
residuals) sits inside them, the matmuls run as they would eagerly.
"""
from __future__ import annotations

import functools

import torch

_COMPILED: dict[type, object] = {}


def block_call(cls: type):
    """The compiled ``(layer, x) -> cls.forward(layer, x)``, one per block class."""
    if cls not in _COMPILED:
        def call(layer, x):
            return cls.forward(layer, x)
        call.__name__ = call.__qualname__ = f"compiled_{cls.__name__}"
        _COMPILED[cls] = torch.compile(call, dynamic=False)
    return _COMPILED[cls]


def compile_blocks(model: torch.nn.Module, block_classes: tuple[type, ...]) -> int:
    """Route every block of ``model`` (an instance of one of ``block_classes``) through its
    class's compiled call; returns how many blocks. A pipeline replica (whose own forward
    repeats the block) gets ``block_forward``, which its forward calls; any other block's
    forward itself is replaced (instance attribute)."""
    n = 0
    for m in model.modules():
        base = next((c for c in block_classes if isinstance(m, c)), None)
        if base is None:
            continue
        fn = functools.partial(block_call(base), m)
        if type(m).forward is base.forward:
            m.forward = fn
        else:
            m.block_forward = fn
        n += 1
    return n
