"""The checkpoint's model and optimizer state, one copy in one format for every use: each rank
writes the fp32 masters and Adam moments it owns to ``<tag>/params/rank_NNNNN.bin`` (raw fp32,
hashed as written and fsynced by that rank; nothing is gathered to another rank) and rank 0
writes ``params/index.json`` from the ranks' metadata alone (apollo_ds.param_store describes
the format). DeepSpeed's own checkpoint files are not written.

Loading (``load``) serves every resume, under the same layout or another one (DP, TP, PP, ZeRO
stage, precision): the new model and engine are built and primed (state.priming), then for
each parameter the rank reads, straight into its engine's fp32 partition and Adam state, only
the elements it owns in the new layout (its ZeRO partition / optimizer fragment of its new TP
slice; the whole TP slice at fp32 ZeRO 0, where a rank holds it whole) from the byte ranges of
the old fragments that overlap them. Under the same layout that is exactly the bytes the rank
wrote (at ZeRO 1-3). The low-precision module weights are then refreshed from the masters as
DeepSpeed does after a step (ZeRO 1/2, bf16: ``update_lp_params``; ZeRO-3: the rank's own
partition, then the persistent parameters re-gathered), and the Adam step counts are set.
Extra memory: none for CPU fp32 partitions (read in place); one fragment's staging buffer when
the state lives on a GPU. A row-parallel weight (partition dim 1) resliced to another TP size
is read one row piece at a time (many small reads, never whole rows it does not own).

Checkpoints written before this format (``params/<name>.pt`` and DeepSpeed's files) still
resume: under the same layout through DeepSpeed's files, otherwise through ``PortableState``.

DeepSpeed's universal checkpoint was not used: it is an offline conversion of the native files
and does not know a pool whose size changes during the run. torch.distributed.checkpoint was
not used either: its resharding works on DTensor / ShardedTensor state dicts, which neither
DeepSpeed's ZeRO partitions nor megatron's TP shards are, and its planner gathers the whole
plan to the coordinator; the fragment format here is a few hundred lines and reads only the
owned byte ranges."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch

from apollo_ds import param_store, rundir
from apollo_ds.config import ConfigError
from apollo_ds.flops import padded_vocab
from apollo_ds.model.gpt import is_vocab_rows
from apollo_ds.training.shards import KEYS, _fragment, _local_shape
from apollo_ds.training.state import (MOMENTS, optimizer_step_count, relink_optimizer_state,
                                      set_step_counts)

PARAMS, INDEX = rundir.PARAMS, rundir.INDEX


def _partition_dim(p) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _meta(name: str, p, tp: int, vocab_size: int) -> dict:
    """Full (layout-free) shape and tensor-parallel partition dim of a local parameter."""
    dim = _partition_dim(p)
    shape = _local_shape(p)
    if dim is not None:
        shape[dim] *= tp
    rows = is_vocab_rows(name, p)
    if rows:
        shape[0] = vocab_size
    return {"shape": shape, "partition_dim": dim, "vocab_rows": rows}


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).to("cpu", torch.float32).contiguous().numpy()
                      ).cast("B")


def write(runtime, tag_dir: str, vocab_size: int) -> dict:
    """Write this rank's fragments into ``tag_dir/params/rank_NNNNN.bin`` (collective: every
    rank calls it; rank 0 also writes the index) and return {relative path: (size, sha256)}
    of the files this rank wrote, each fsynced."""
    d, engine = runtime.dist, runtime.engine
    relink_optimizer_state(engine)
    out = os.path.join(tag_dir, PARAMS)
    os.makedirs(out, exist_ok=True)
    fname = param_store.rank_file(d.rank)
    metas, rows = {}, []

    def fill(w) -> None:
        offset = 0
        for name, p in runtime.named_parameters():
            metas[name] = _meta(name, p, d.tp, vocab_size)
            f = _fragment(engine, p, d.dp, d.dp_rank, copy=False)
            n = f.values["param"].numel() if f is not None else 0
            if not n:
                continue
            for k in KEYS:
                v = f.values.get(k)
                w.write(bytes(4 * n) if v is None else _bytes(v))   # a moment not made yet: 0
            rows.append((name, [fname, d.pp_rank, d.tp, d.tp_rank, _local_shape(p), f.start,
                                n, offset]))
            offset += 4 * len(KEYS) * n
    written = {f"{PARAMS}/{fname}": rundir.save_hashed(fill, os.path.join(out, fname))}
    everyone = [(metas, rows)]
    if torch.distributed.is_initialized() and d.world > 1:
        everyone = [None] * d.world
        torch.distributed.all_gather_object(everyone, (metas, rows))
    if d.rank == 0:
        params, frags = {}, {}
        for m, r in everyone:
            for name, meta in m.items():
                params.setdefault(name, meta)
            for name, row in r:
                frags.setdefault(name, []).append(row)
        index = {"format": param_store.FORMAT, "optimizer_step": optimizer_step_count(engine),
                 "vocab_size": vocab_size, "params": dict(sorted(params.items())),
                 "fragments": dict(sorted(frags.items()))}
        written[f"{PARAMS}/{INDEX}"] = rundir.save_hashed(
            json.dumps(index, separators=(",", ":")).encode(), os.path.join(out, INDEX))
    return written


def is_fragmented(tag_dir: str) -> bool:
    """The checkpoint is in the per-rank fragment format (else an older one)."""
    return isinstance(rundir.param_reader(tag_dir), param_store.FragmentReader)


def _targets(engine, p, dp: int, dp_rank: int):
    """(first element, {key: 1-D fp32 tensor the engine keeps}) this rank owns of ``p``'s TP
    slice in its engine: ZeRO-3 partition, ZeRO-1/2 / bf16 fragment, or the whole parameter
    and its Adam state at fp32 ZeRO 0; None where it owns nothing."""
    if hasattr(p, "ds_id"):
        z3 = p._z3_optimizer
        views = {k: z3.get_local_fp32_param(p, None if k == "param" else k) for k in KEYS}
        size = views["param"].numel()
        start = torch.distributed.get_rank(group=p.ds_process_group) * size
        n = max(0, min(size, p.ds_numel - start))
        return start, {k: v.reshape(-1)[:n] for k, v in views.items()}
    if hasattr(p, "_hp_mapping"):
        m = p._hp_mapping
        if m is None:
            return None
        views = {"param": m.hp_fragment}
        views.update({k: m.optim_fragment[k] for k in MOMENTS})
        return m.lp_fragment_address.start, {k: v.reshape(-1) for k, v in views.items()}
    state = engine.optimizer.state[p]
    return 0, {"param": p.data.reshape(-1), **{k: state[k].reshape(-1) for k in MOMENTS}}


def _fill(reader, name: str, views: dict, **where) -> None:
    """Read into the engine's tensors: in place when they are contiguous CPU fp32, else
    through one staging buffer per key."""
    direct = {k: v.detach().numpy() for k, v in views.items()
              if v.device.type == "cpu" and v.dtype == torch.float32 and v.is_contiguous()}
    staged = {k: np.empty(v.numel(), dtype="<f4") for k, v in views.items() if k not in direct}
    reader.read_into(name, {**direct, **staged}, **where)
    for k, buf in staged.items():
        views[k].copy_(torch.from_numpy(buf))


def load(runtime, tag_dir: str, vocab_size: int) -> None:
    """Fill ``runtime``'s built and primed engine from the checkpoint's fragments (every rank
    calls it; collective only for the final low-precision refresh). Every recorded shape is
    checked against the model's first: a mismatch is one ConfigError naming the parameter,
    the index and both shapes."""
    d, engine = runtime.dist, runtime.engine
    reader = rundir.param_reader(tag_dir)
    relink_optimizer_state(engine)
    whole, owned = [], 0
    try:
        for name, p in runtime.named_parameters():
            meta = _meta(name, p, d.tp, vocab_size)
            if name not in reader.params:
                raise ConfigError(f"{reader.index_path} holds no parameter {name!r}: the "
                                  f"checkpoint was written by another model")
            rec = reader.params[name]
            if (list(rec["shape"]) != meta["shape"]
                    or rec.get("partition_dim") != meta["partition_dim"]):
                raise ConfigError(
                    f"parameter {name}: {reader.index_path} records shape {rec['shape']} "
                    f"(tensor-parallel dim {rec.get('partition_dim')}) but the model's is "
                    f"{meta['shape']} (dim {meta['partition_dim']}); the checkpoint was written "
                    f"by another model")
            local = _local_shape(p)
            dim = meta["partition_dim"]
            padded = (local[0] * (d.tp if dim == 0 else 1)) if meta["vocab_rows"] else None
            got = _targets(engine, p, d.dp, d.dp_rank)
            if got is None:
                continue
            start, views = got
            owned += views["param"].numel()
            if views["param"].numel():
                with torch.no_grad():
                    _fill(reader, name, views, tp=d.tp, tp_rank=d.tp_rank, padded_rows=padded,
                          lo=start, pp_rank=d.pp_rank)
            if hasattr(p, "ds_id"):   # the module's own (low-precision) partition
                n = views["param"].numel()
                with torch.no_grad():
                    p.ds_tensor.data.reshape(-1)[:n].copy_(views["param"])
                if p.data.numel() == p.ds_numel:   # resident whole: re-gathered below
                    whole.append(p)
    finally:
        reader.close()
    opt = engine.optimizer
    if whole:
        whole[0].partition(whole)
        whole[0].all_gather(whole)
    elif hasattr(opt, "update_lp_params") and not hasattr(opt, "fp32_partitioned_groups_flat"):
        opt.update_lp_params()   # ZeRO 1/2, bf16: module weights from the masters (all-gather)
    set_step_counts(engine, reader.optimizer_step)
    if os.environ.get("APOLLO_LOAD_PROFILE"):   # a file: each rank appends what it read
        with open(os.environ["APOLLO_LOAD_PROFILE"], "a") as f:
            f.write(json.dumps({"rank": d.rank, "owned": owned,
                                "read": dict(reader.bytes_read)}) + "\n")


class PortableState(Mapping):
    """An older checkpoint's ``params/<name>.pt`` files as name -> this rank's {"param",
    "exp_avg", "exp_avg_sq"} (its tensor-parallel slice of the full fp32 tensors, vocabulary
    padded for its TP size), read on access and not kept: pass it to ``Runtime.build``."""

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
