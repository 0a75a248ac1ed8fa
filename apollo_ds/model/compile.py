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
residuals) sits inside them, the matmuls run as they would eagerly. Under tensor parallelism
every parallel linear and its collectives stay eager (``_TP_EAGER``), splitting the block
further.
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


# megatron-core's tensor-parallel linear and its collectives, as layers.py names them: traced,
# torch.compile turns the all-reduces into functional collectives (the gloo ones abort), so
# under TP they stay eager (graph breaks): the compiled graphs hold the elementwise work.
_TP_EAGER = ("linear_with_grad_accumulation_and_async_allreduce",
             "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
             "gather_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region")


def _tp_collectives_eager() -> None:
    from megatron.core.tensor_parallel import layers
    for name in _TP_EAGER:
        fn = getattr(layers, name)
        if not getattr(fn, "_apollo_eager", False):
            eager = torch.compiler.disable(fn)
            eager._apollo_eager = True
            setattr(layers, name, eager)


def compile_blocks(model: torch.nn.Module, block_classes: tuple[type, ...],
                   tp: int = 1) -> int:
    """Route every block of ``model`` (an instance of one of ``block_classes``) through its
    class's compiled call; returns how many blocks. A pipeline replica (whose own forward
    repeats the block) gets ``block_forward``, which its forward calls; any other block's
    forward itself is replaced (instance attribute). ``tp`` > 1: megatron's parallel linears
    and collectives run eagerly between the compiled pieces."""
    if tp > 1:
        _tp_collectives_eager()
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
