"""fp32 sums for the gradients of a pool layer used several times in one forward (bf16).

A pool layer that runs at k positions of a micro-batch gets k gradient contributions per
parameter. Autograd adds them in the parameter's dtype, so in bf16 the sum takes k - 1
successive bf16 roundings (Apollo's first stages: one unique layer, 12 positions). Here each use
runs on its own alias of every parameter (``p.view_as(p)``, swapped in as
``torch.func.functional_call`` does), whose gradient hook adds the use's contribution into an
fp32 buffer and passes on zeros; the last use to arrive passes on the fp32 sum, rounded to bf16
once. Autograd then adds k - 1 exact
zeros and one value: the parameter's gradient hook (DeepSpeed's ZeRO reduction) still fires
once per parameter per micro-batch, with the fp32-summed gradient.

Not under ZeRO-3 (parameters partitioned: aliases taken before DeepSpeed gathers them would see
the empty partitions): there the uses are summed in bf16 as before. fp32 models need nothing.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn


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


def use_sums(layers, layer_map: list[int]) -> dict[int, UseSum]:
    """Pool index -> UseSum for every layer of ``layers`` that ``layer_map`` runs more than
    once, when its parameters are bf16, autograd is on and ZeRO-3 does not partition them."""
    if not torch.is_grad_enabled():
        return {}
    out = {}
    for idx, k in Counter(layer_map).items():
        if k < 2:
            continue
        p = next(layers[idx].parameters(), None)
        if p is not None and p.dtype == torch.bfloat16 and not _partitioned(p):
            out[idx] = UseSum(layers[idx], k)
    return out
