"""The layout-free half of a checkpoint: every parameter's fp32 master and Adam moments in a
file of its own (``<tag>/params/<canonical name>.pt``: ZeRO partitions gathered, tensor-parallel
shards concatenated, vocabulary padding dropped) plus ``params/index.json`` (full shapes,
tensor-parallel partition dims, the optimizer step). It lets a run resume under any other
(DP, TP, PP, ZeRO stage, precision) layout: each rank builds its new model and engine as an
expansion does (``Runtime.build`` from a state), reading only the files of the parameters its
pipeline stage holds, one tensor at a time, and slicing its own tensor-parallel part.

Memory: writing holds one parameter's full tensors (3 x its size) at a time on top of the
engine; reading holds one file at a time (memory-mapped), so a reshaped load needs the new
rank's own model and optimizer shard plus the largest single parameter's tensors (3 x, fp32).

DeepSpeed's universal checkpoint (``ds_to_universal``) was not used: it is an offline
conversion of the native files, does not know a pool whose size changes during the run, and
does not cover ZeRO-0 fp32 (no optimizer partitions to convert)."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from apollo_ds import rundir
from apollo_ds.distributed import all_gather_tensor
from apollo_ds.flops import padded_vocab
from apollo_ds.model.gpt import is_vocab_rows
from apollo_ds.training.state import optimizer_step_count, read_entry, relink_optimizer_state

PARAMS, INDEX = rundir.PARAMS, rundir.INDEX


def _partition_dim(p) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _pipe_group():
    from megatron.core import parallel_state
    return parallel_state.get_pipeline_model_parallel_group()


def _tp_group():
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def write(runtime, tag_dir: str, vocab_size: int) -> None:
    """Write the layout-free state of ``runtime``'s engine into ``tag_dir/params`` (collective:
    every rank calls it). The DP-rank-0, TP-rank-0 process of the first pipeline stage that
    holds a parameter writes its file; global rank 0 writes the index."""
    d, engine = runtime.dist, runtime.engine
    named = list(runtime.named_parameters())
    mine = {name: _meta(name, p, d.tp, vocab_size) for name, p in named}
    stages = [mine]
    if d.pp > 1:
        stages = [None] * d.pp
        torch.distributed.all_gather_object(stages, mine, group=_pipe_group())
    owner, every = {}, {}
    for k, metas in enumerate(stages):
        for name, meta in metas.items():
            owner.setdefault(name, k)
            every.setdefault(name, meta)
    writer = d.dp_rank == 0 and d.tp_rank == 0
    out = os.path.join(tag_dir, PARAMS)
    if writer:
        os.makedirs(out, exist_ok=True)
    relink_optimizer_state(engine)
    for name, p in named:
        entry = read_entry(engine, p)          # collective over DP
        dim = mine[name]["partition_dim"]
        for key, t in entry.items():
            if t is None:
                t = torch.zeros_like(entry["param"])
            if dim is not None and d.tp > 1:  # collective over TP
                t = torch.cat(all_gather_tensor(t, group=_tp_group()), dim=dim)
            if mine[name]["vocab_rows"]:
                t = t[:vocab_size]
            entry[key] = t.contiguous()
        if writer and owner[name] == d.pp_rank:
            path = os.path.join(out, name + ".pt")
            torch.save(entry, path + ".tmp")
            os.replace(path + ".tmp", path)
        del entry
    step = optimizer_step_count(engine)
    if d.rank == 0:
        index = {"optimizer_step": step, "vocab_size": vocab_size,
                 "params": dict(sorted(every.items()))}
        with open(os.path.join(out, INDEX) + ".tmp", "w") as f:
            json.dump(index, f, indent=1)
        os.replace(os.path.join(out, INDEX) + ".tmp", os.path.join(out, INDEX))


def _meta(name: str, p, tp: int, vocab_size: int) -> dict:
    """Full (layout-free) shape and tensor-parallel partition dim of a local parameter."""
    dim = _partition_dim(p)
    shape = list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)   # ZeRO-3: partitioned
    if dim is not None:
        shape[dim] *= tp
    rows = is_vocab_rows(name, p)
    if rows:
        shape[0] = vocab_size
    return {"shape": shape, "partition_dim": dim, "vocab_rows": rows}


def has_portable(tag_dir: str) -> bool:
    return rundir.has_params(tag_dir)


class PortableState(Mapping):
    """name -> this rank's {"param", "exp_avg", "exp_avg_sq"} (its tensor-parallel slice of
    the full fp32 tensors, vocabulary padded for its TP size), read from the files on access
    (rundir.ParamReader: shapes checked) and not kept: pass it to ``Runtime.build`` as the
    state to start from."""

    def __init__(self, tag_dir: str, model_cfg, tp: int, tp_rank: int):
        self.reader = rundir.param_reader(tag_dir)
        self.optimizer_step = self.reader.optimizer_step
        self.tp, self.tp_rank = tp, tp_rank
        self.padded_vocab = padded_vocab(model_cfg.vocab_size, model_cfg.pad_vocab_to, tp)

    def __iter__(self):
        return iter(self.reader.names)

    def __len__(self) -> int:
        return len(self.reader.names)

    def __getitem__(self, name: str) -> dict:
        return self.reader.read(name, self.tp, self.tp_rank, padded_rows=self.padded_vocab)
