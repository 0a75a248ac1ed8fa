"""The layout-free half of a checkpoint: every parameter's fp32 master and Adam moments in a
file of its own (``<tag>/params/<canonical name>.pt``: ZeRO partitions gathered, tensor-parallel
shards concatenated, vocabulary padding dropped) plus ``params/index.json`` (full shapes,
tensor-parallel partition dims, the optimizer step). It lets a run resume under any other
(DP, TP, PP, ZeRO stage, precision) layout: each rank builds its new model and engine as an
expansion does (``Runtime.build`` from a state), reading only the files of the parameters its
pipeline stage holds, one tensor at a time, and slicing its own tensor-parallel part.

Writing is spread over the ranks: each parameter's writer receives the other ranks' fragments
of it point-to-point (nothing is gathered to every rank) and holds that one parameter's full
tensors (3 x its size, twice while joining TP shards) on top of the engine. Reading holds
one file at a time (memory-mapped), so a reshaped load needs the new rank's own model and
optimizer shard plus the largest single parameter's tensors (3 x, fp32).

DeepSpeed's universal checkpoint (``ds_to_universal``) was not used: it is an offline
conversion of the native files, does not know a pool whose size changes during the run, and
does not cover ZeRO-0 fp32 (no optimizer partitions to convert)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import torch

from apollo_ds import rundir
from apollo_ds.distributed import comm_device
from apollo_ds.flops import padded_vocab
from apollo_ds.model.gpt import is_vocab_rows
from apollo_ds.training.shards import KEYS, _local_shape, own_fragments
from apollo_ds.training.state import optimizer_step_count

PARAMS, INDEX = rundir.PARAMS, rundir.INDEX


def _partition_dim(p) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def write(runtime, tag_dir: str, vocab_size: int) -> dict:
    """Write the layout-free state of ``runtime``'s engine into ``tag_dir/params`` (collective:
    every rank calls it) and return {relative path: (size, sha256)} of the files this rank
    wrote, each fsynced. The parameters a pipeline stage owns (the first stage holding one) are
    spread over that stage's DP x TP ranks, balanced by size: every rank of the stage sends its
    own fp32 fragments (ZeRO partition, optimizer fragment, or 1/dp slice) of each parameter
    point-to-point to that parameter's writer only, which joins the DP parts, then the TP
    shards, drops the vocabulary padding and writes, hashing as it writes. Global rank 0
    writes the index."""
    d, engine = runtime.dist, runtime.engine
    named = list(runtime.named_parameters())
    frags = own_fragments(engine, named, d.dp, d.dp_rank)
    mine = {name: _meta(name, p, d.tp, vocab_size) for name, p in named}
    shapes = {name: _local_shape(p) for name, p in named}
    ranges = {name: (f.start, _numel(f)) for name, f in frags.items()}
    everyone = [(d.rank, d.pp_rank, d.tp_rank, mine, ranges)]
    if torch.distributed.is_initialized() and d.world > 1:
        everyone = [None] * d.world
        torch.distributed.all_gather_object(everyone, (d.rank, d.pp_rank, d.tp_rank, mine,
                                                       ranges))
    every, owner = {}, {}
    for _r, pp_rank, _t, metas, _f in sorted(everyone, key=lambda e: e[1]):
        for name, meta in metas.items():
            every.setdefault(name, meta)
            owner.setdefault(name, pp_rank)
    stage = sorted((e for e in everyone if e[1] == d.pp_rank), key=lambda e: e[0])
    out = os.path.join(tag_dir, PARAMS)
    os.makedirs(out, exist_ok=True)
    written, sends = {}, []
    owned = [name for name, _ in named if owner[name] == d.pp_rank]
    writers = _writers(owned, every, [e[0] for e in stage])
    # every send is posted first, so a writer never waits for a peer busy with its own files
    for j, name in enumerate(owned):
        f, dim = frags.get(name), mine[name]["partition_dim"]
        if (writers[j] != d.rank and f is not None and ranges[name][1]
                and (dim is not None or d.tp_rank == 0)):   # replicated: from TP rank 0
            sends += _send(f, ranges[name][1], writers[j], tag=j)
    for j, name in enumerate(owned):
        if writers[j] != d.rank:
            continue
        dim = mine[name]["partition_dim"]
        sources = [e for e in stage if dim is not None or e[2] == 0]
        parts = _receive(name, j, frags.get(name), sources, d, shapes[name])
        full = {}
        for k in KEYS:
            shards = [parts[t][k] for t in sorted(parts)]
            t = torch.cat(shards, dim=dim) if dim is not None and len(shards) > 1 else shards[0]
            if mine[name]["vocab_rows"]:
                t = t[:vocab_size]
            full[k] = t.contiguous()
        del parts
        written[f"{PARAMS}/{name}.pt"] = rundir.save_hashed(full,
                                                            os.path.join(out, name + ".pt"))
        del full
    for work, _tensor in sends:
        work.wait()
    if d.rank == 0:
        index = {"optimizer_step": optimizer_step_count(engine), "vocab_size": vocab_size,
                 "params": dict(sorted(every.items()))}
        written[f"{PARAMS}/{INDEX}"] = rundir.save_hashed(
            json.dumps(index, indent=1).encode(), os.path.join(out, INDEX))
    return written


def _writers(owned: list[str], metas: dict, ranks: list[int]) -> list[int]:
    """The writer of each owned parameter: the stage rank with the fewest elements assigned
    so far (round robin would put every layer's large weights on the same ranks)."""
    load, out = [0] * len(ranks), []
    for name in owned:
        k = min(range(len(ranks)), key=lambda i: (load[i], i))
        load[k] += math.prod(metas[name]["shape"])
        out.append(ranks[k])
    return out


def _numel(f) -> int:
    return f.values["param"].numel()


def _send(f, n: int, writer: int, tag: int) -> list:
    """Post this rank's fragment of one parameter (master, then both moments; a moment not
    created yet as zeros) to its writer; the sends complete while later parameters go on."""
    dev = comm_device()
    pending = []
    for i, k in enumerate(KEYS):
        v = f.values.get(k)
        v = torch.zeros(n) if v is None else v.detach().reshape(-1)
        v = v.to(dev, torch.float32).contiguous()
        # the tensor stays referenced until its send is waited for
        pending.append((torch.distributed.isend(v, writer, tag=3 * tag + i), v))
    return pending


def _receive(name: str, j: int, own, sources, d, shape) -> dict:
    """tp_rank -> {key: that TP shard's full fp32 tensor}, from the fragments of ``sources``
    (this rank's own copied, the others' received in rank order)."""
    n = math.prod(shape)
    parts = {}
    dev = comm_device()
    for rank, _pp, tp_rank, _m, ranges in sources:
        start, count = ranges.get(name, (0, 0))
        bufs = parts.setdefault(tp_rank, {k: torch.zeros(n) for k in KEYS})
        if not count:
            continue
        for i, k in enumerate(KEYS):
            dst = bufs[k][start:start + count]
            if rank == d.rank:
                v = own.values.get(k)
                if v is not None:
                    dst.copy_(v.detach().reshape(-1))
            elif dev.type == "cpu":     # straight into place (a 1-D slice is contiguous)
                torch.distributed.recv(dst, rank, tag=3 * j + i)
            else:
                got = torch.empty(count, dtype=torch.float32, device=dev)
                torch.distributed.recv(got, rank, tag=3 * j + i)
                dst.copy_(got)
    return {t: {k: v.view(shape) for k, v in b.items()} for t, b in parts.items()}


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
