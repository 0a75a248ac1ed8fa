"""A rank's own share of a DeepSpeed engine's fp32 state, and one-parameter-at-a-time gathers of
it, so that an expansion never holds more than one parameter's full tensors.

``own_fragments`` takes from an engine, per canonical parameter, the flat range of its
(tensor-parallel shard's) fp32 master and Adam moments that this rank owns: its ZeRO-3
partition, its ZeRO-1/2 / bf16 optimizer fragment (``_hp_mapping``), or at fp32 ZeRO 0 (where
every rank holds everything) an even 1/dp slice, copied. The fragments outlive the engine.
``ShardSource.gather(name, keys)`` rebuilds one parameter's TP shard from the fragments with an
all-reduce over the data-parallel group (and over the pipeline group, whose first stage holding
the name contributes), into one buffer of ``len(keys) x numel`` fp32 elements.

``METER`` counts the bytes of gathered buffers alive at once (peak) and in all (total): the
expansion logs them and a test asserts the peak is one parameter's, not the model's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from apollo_ds.distributed import comm_device
from apollo_ds.training.state import MOMENTS, relink_optimizer_state

KEYS = ("param",) + MOMENTS


class GatherMeter:
    """Bytes of gathered buffers: alive now, the most alive at once, and gathered in all."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.live = self.peak = self.total = 0

    def take(self, nbytes: int) -> None:
        self.live += nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.live)

    def give(self, nbytes: int) -> None:
        self.live -= nbytes


METER = GatherMeter()


@dataclass
class Fragment:
    """Elements [start, start + n) of a flattened parameter (TP shard): key -> 1-D fp32."""
    start: int
    values: dict = field(default_factory=dict)


def _local_shape(p) -> list[int]:
    return list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)   # ZeRO-3: partitioned


def _fragment(engine, p, dp: int, dp_rank: int, copy: bool = True) -> Fragment | None:
    """This rank's Fragment of ``p``; ``copy=False``: at fp32 ZeRO 0 views of the engine's
    tensors instead of copies (valid until the next step)."""
    if hasattr(p, "ds_id"):   # ZeRO-3: this rank's partition of the flat parameter
        z3 = p._z3_optimizer
        parts = {k: z3.get_local_fp32_param(p, None if k == "param" else k) for k in KEYS}
        size = parts["param"].numel()
        start = torch.distributed.get_rank(group=p.ds_process_group) * size
        n = max(0, min(size, p.ds_numel - start))
        return Fragment(start, {k: v.detach().reshape(-1)[:n] for k, v in parts.items()})
    if hasattr(p, "_hp_mapping"):   # ZeRO 1/2, bf16: the optimizer fragment, if any
        m = p._hp_mapping
        if m is None:
            return None
        values = {"param": m.hp_fragment.detach().reshape(-1)}
        for k in MOMENTS:
            frag = (m.optim_fragment or {}).get(k)
            values[k] = frag.detach().reshape(-1) if frag is not None else None
        return Fragment(m.lp_fragment_address.start, values)
    # fp32 ZeRO 0: every rank holds the whole parameter; keep (a copy of) an even 1/dp slice
    n = p.numel()
    lo, hi = dp_rank * n // dp, (dp_rank + 1) * n // dp
    state = engine.optimizer.state.get(p, {})
    def part(t):
        t = t.detach().reshape(-1)[lo:hi]
        return t.float().clone() if copy else t
    values = {"param": part(p)}
    for k in MOMENTS:
        t = state.get(k)
        values[k] = part(t) if t is not None else None
    return Fragment(lo, values)


def own_fragments(engine, named_parameters, dp: int, dp_rank: int) -> dict[str, Fragment]:
    """canonical name -> this rank's Fragment (views of the engine's fp32 partitions under
    ZeRO 1-3 / bf16, which keep only those partitions alive once the engine is destroyed)."""
    relink_optimizer_state(engine)
    out = {}
    for name, p in named_parameters:
        f = _fragment(engine, p, dp, dp_rank)
        if f is not None:
            out[name] = f
    return out


class ShardSource:
    """The old engine's state as this rank's fragments plus every parameter's TP-shard shape
    (all pipeline stages'), readable one parameter at a time after the engine is gone."""

    def __init__(self, fragments: dict, shapes: dict, owner: dict, pp_rank: int,
                 dp_group, pp_group=None):
        self.fragments, self.shapes, self.owner = fragments, shapes, owner
        self.pp_rank, self.dp_group, self.pp_group = pp_rank, dp_group, pp_group

    @classmethod
    def of(cls, engine, named_parameters, dist, dp_group, pp_group=None):
        """Collective over the pipeline group (shapes of every stage's parameters)."""
        named = list(named_parameters)
        shapes = {name: _local_shape(p) for name, p in named}
        per_stage = [shapes]
        if pp_group is not None and dist.pp > 1:
            per_stage = [None] * dist.pp
            torch.distributed.all_gather_object(per_stage, shapes, group=pp_group)
        merged, owner = {}, {}
        for k, stage in enumerate(per_stage):
            for name, shape in stage.items():
                merged.setdefault(name, shape)
                owner.setdefault(name, k)
        frags = own_fragments(engine, named, dist.dp, dist.dp_rank)
        return cls(frags, merged, owner, dist.pp_rank, dp_group,
                   pp_group if dist.pp > 1 else None)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def numel(self, name: str) -> int:
        return math.prod(self.shapes[name])

    def gather(self, name: str, keys=KEYS) -> dict[str, torch.Tensor]:
        """key -> the full TP-shard fp32 tensor of ``name`` (a missing moment reads as zero),
        views of one buffer of len(keys) x numel elements, counted by METER until ``release``.
        Collective: every rank of the data-parallel (and pipeline) group calls it for the same
        names in the same order."""
        n = self.numel(name)
        buf = torch.zeros(len(keys), n, dtype=torch.float32, device=comm_device(self.dp_group))
        f = self.fragments.get(name)
        if f is not None and self.owner[name] == self.pp_rank:
            for j, k in enumerate(keys):
                v = f.values.get(k)
                if v is not None and v.numel():
                    buf[j, f.start:f.start + v.numel()].copy_(v)
        # every element is owned by exactly one rank, so the sums are exact copies
        torch.distributed.all_reduce(buf, group=self.dp_group)
        if self.pp_group is not None:
            torch.distributed.all_reduce(buf, group=self.pp_group)
        METER.take(buf.nbytes)
        out = {k: buf[j].view(self.shapes[name]) for j, k in enumerate(keys)}
        out["_buffer"] = buf
        return out

    @staticmethod
    def release(entry: dict) -> None:
        buf = entry.pop("_buffer", None)
        if buf is not None:
            METER.give(buf.nbytes)

    def drop(self) -> None:
        self.fragments = {}
