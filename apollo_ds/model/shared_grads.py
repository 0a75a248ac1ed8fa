"""fp32 sums for the gradients of a pool layer used several times in one forward (bf16).

A pool layer that runs at k positions of a micro-batch gets k gradient contributions per
parameter. Autograd adds them in the parameter's dtype, so in bf16 the sum takes k - 1
successive bf16 roundings (Apollo's first stages: one unique layer, 12 positions). Both
variants below add the k contributions into one fp32 buffer per parameter and hand the
parameter's gradient hook (where DeepSpeed's ZeRO reduction runs) the fp32 sum, rounded to
bf16 once, exactly once per parameter per micro-batch.

``UseSum`` (parameters whole: ZeRO 0-2, pipeline replicas): each use runs on its own alias of
every parameter (``p.view_as(p)``, swapped in as ``torch.func.functional_call`` does), whose
gradient hook adds the use's contribution into the buffer and passes on zeros; the last use
to arrive passes on the sum. Autograd then adds k - 1 exact zeros and one value.

``NestedUseSum`` (ZeRO-3): a parameter is partitioned (empty) outside the forward and backward
of its own module, where DeepSpeed's module hooks gather it, so an alias taken before the call
would be empty and one taken inside would pin the gathered copy until backward. Instead each
use runs as its own inner autograd graph (``_Use``, like a reentrant checkpoint that keeps its
activations): in backward, every use but the last to arrive takes its parameter gradients with
``torch.autograd.grad`` (DeepSpeed still gathers and releases the parameters through its module
hooks; the gradients are not accumulated, so no reduction fires) and adds them to the buffer;
the last runs a real backward, whose hook on each parameter swaps its contribution for the
whole sum before the gradient is accumulated and reduced. The buffers are full-size fp32 (the
layer's parameters, while its uses' backward runs: Apollo's uses of a layer are consecutive).

fp32 models need neither.
"""
from __future__ import annotations

import functools
from collections import Counter

import torch
from torch import nn

from apollo_ds.model.recompute import checkpoint


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")   # a ZeRO-3 parameter


class UseSum:
    """The uses of ``layer`` in one forward; ``call(x)`` runs one use on fresh aliases."""

    def __init__(self, layer: nn.Module, uses: int):
        self.layer, self.uses = layer, uses
        self.params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        self.acc: dict[str, torch.Tensor] = {}
        self.seen: Counter = Counter()

    def _hook(self, name: str):
        def hook(g: torch.Tensor) -> torch.Tensor:
            buf = self.acc.get(name)
            buf = g.float() if buf is None else buf.add_(g)
            self.seen[name] += 1
            if self.seen[name] < self.uses:
                self.acc[name] = buf
                return torch.zeros_like(g)
            self.acc.pop(name, None)
            return buf.to(g.dtype)
        return hook

    def call(self, x: torch.Tensor, fn=None) -> torch.Tensor:
        """``fn(x)`` (default: the layer itself) with the layer's parameters swapped for
        this use's aliases (torch.func.functional_call's mechanism, for any function: a
        pipeline replica runs its block's forward, not its own)."""
        from torch.nn.utils.stateless import _reparametrize_module
        aliases = {}
        for name, p in self.params:
            alias = p.view_as(p)
            alias.register_hook(self._hook(name))
            aliases[name] = alias
        with _reparametrize_module(self.layer, aliases):
            return (fn or self.layer)(x)

    def run(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """One use; with ``recompute`` its activations are rebuilt in backward."""
        return checkpoint(self.call, x) if recompute else self.call(x)


class _Use(torch.autograd.Function):
    """One use of a layer as an inner graph from a detached input; backward hands the
    output gradient to ``NestedUseSum.backward_use``."""

    @staticmethod
    def forward(ctx, x, use_sum, recompute):
        x_in = x.detach().requires_grad_()
        with torch.enable_grad():
            layer = use_sum.layer
            out = checkpoint(layer, x_in) if recompute else layer(x_in)
        ctx.use_sum, ctx.x_in, ctx.out = use_sum, x_in, out
        return out.detach()

    @staticmethod
    def backward(ctx, g):
        x_in, out = ctx.x_in, ctx.out
        ctx.x_in = ctx.out = None
        with torch.enable_grad():
            return ctx.use_sum.backward_use(out, x_in, g), None, None


class NestedUseSum:
    """The uses of ``layer`` in one forward under ZeRO-3; see the module docstring."""

    def __init__(self, layer: nn.Module, uses: int):
        self.layer, self.uses = layer, uses
        self.params = [p for p in layer.parameters() if p.requires_grad]
        self.acc: list[torch.Tensor | None] = [None] * len(self.params)
        self.seen = 0

    def run(self, x: torch.Tensor, recompute: bool = False) -> torch.Tensor:
        """One use; with ``recompute`` its activations are rebuilt in its own backward."""
        return _Use.apply(x, self, recompute)

    def backward_use(self, out, x_in, g) -> torch.Tensor:
        self.seen += 1
        if self.seen < self.uses:
            grads = torch.autograd.grad(out, [x_in, *self.params], g, allow_unused=True)
            for i, gp in enumerate(grads[1:]):
                if gp is not None:
                    self.acc[i] = gp.float() if self.acc[i] is None else self.acc[i].add_(gp)
            return grads[0]
        hooks = [p.register_hook(functools.partial(self._last, i))
                 for i, p in enumerate(self.params)]
        try:
            torch.autograd.backward(out, g)
        finally:
            for h in hooks:
                h.remove()
            self.acc = [None] * len(self.params)
        return x_in.grad

    def _last(self, i: int, g: torch.Tensor) -> torch.Tensor:
        acc = self.acc[i]
        return g if acc is None else acc.add_(g).to(g.dtype)


def use_sums(layers, layer_map: list[int]) -> dict[int, UseSum | NestedUseSum]:
    """Pool index -> UseSum (NestedUseSum under ZeRO-3) for every layer of ``layers`` that
    ``layer_map`` runs more than once, when its parameters are bf16 and autograd is on."""
    if not torch.is_grad_enabled():
        return {}
    out = {}
    for idx, k in Counter(layer_map).items():
        if k < 2:
            continue
        p = next(layers[idx].parameters(), None)
        if p is not None and p.dtype == torch.bfloat16:
            out[idx] = (NestedUseSum if _partitioned(p) else UseSum)(layers[idx], k)
    return out
