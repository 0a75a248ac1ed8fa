"""The Runtime seam: how one optimizer step runs, in one place.

A Runtime owns the model and the DeepSpeed engine of the current pool size and offers
  build(n_unique, state=None)   a model + engine for that pool (optionally from a full state)
  run_step(step, plan, guard)   all micro-batches of one optimizer step; right before the
                                optimizer step ``guard`` decides step or skip (nonfinite.py)
  evaluate()                    held-out loss at full depth
  shard_source()                this rank's own fp32 fragments, gathered one parameter at a
                                time (the streamed expansion, training/growth.py)
  full_state() / load_full_state(state, step)
                                fp32 masters + Adam moments by canonical parameter name
  full_weights()                full unsharded fp32 weights (export, parity tests)
``DataParallelRuntime`` runs PoolGPT under DP/TP/ZeRO 0-3; ``PipelineRuntime``
(pipeline_runtime.py) runs the DeepSpeed PipelineModule. The Trainer sees only this interface.

Nothing here reads a device value back to the host: losses are summed on the device, and the
Trainer syncs once per step (``apollo_ds.distributed.all_reduce``).
"""
from __future__ import annotations

import gc

import torch

from apollo_ds.apollo import layer_map
from apollo_ds.data import get_micro_batch
from apollo_ds.distributed import MegatronMPU, all_reduce
from apollo_ds.model import PoolGPT, init_weights
from apollo_ds.training import faults, nonfinite
from apollo_ds.training.engine import (build_engine, model_dtype, param_groups, pool_lr_scale,
                                      zero_stage)
from apollo_ds.training.shards import ShardSource
from apollo_ds.training.state import optimizer_step_count, priming, read_state, write_state


class Runtime:
    def __init__(self, cfg, dist, ds_config: dict, train_ds, valid_ds):
        self.cfg, self.dist, self.ds_config = cfg, dist, ds_config
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.dtype = model_dtype(ds_config)
        self.recompute = cfg.train.recompute   # none | selective | full
        t = cfg.train
        self.grad_accum = t.global_batch // (t.micro_batch * dist.dp)
        self.model = self.engine = None
        self._pin = dist.on_cuda
        self.step_offsets: list[int] = []   # per pool layer: its Adam step = step - offset
        # set by run_step for its optimizer step only (nonfinite.install reads and clears it)
        self.step_guard = None

    # ------------------------------------------------------------------ to be provided
    def new_model(self, n_unique: int):
        raise NotImplementedError

    def canonical(self, model):
        """(canonical name, parameter) of ``model``'s parameters on this rank."""
        raise NotImplementedError

    def named_parameters(self):
        return self.canonical(self.model)

    def _make_engine(self, model):
        raise NotImplementedError

    def _prime_step(self) -> None:
        """One train step on zero-loss inputs (under ``priming``)."""
        raise NotImplementedError

    def run_step(self, step: int, plan, guard=None) -> torch.Tensor:
        """Sum over this rank's micro-batches of their mean loss (a device tensor). With
        ``guard(loss_share, grad_norm, is_global) -> bool`` (nonfinite.install), called once
        after the last backward: False skips the optimizer update."""
        raise NotImplementedError

    def step_loss_share(self) -> torch.Tensor:
        """This rank's share of the step's mean loss: summed over all ranks it is the mean
        over the global batch (read by the guard before the optimizer step)."""
        raise NotImplementedError

    def evaluate(self) -> float:
        raise NotImplementedError

    def full_weights(self) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    @property
    def n_unique(self) -> int:
        return self.model.n_unique

    def batch(self, ds, start: int) -> dict:
        """Micro-batch of samples [start, start + micro_batch) on the device (pinned and
        asynchronous on CUDA, so the copy overlaps the previous micro-batch's compute)."""
        b = get_micro_batch(ds, start, self.cfg.train.micro_batch)
        if self._pin:
            return {k: v.pin_memory().to(self.dist.device, non_blocking=True)
                    for k, v in b.items()}
        return {k: v.to(self.dist.device) for k, v in b.items()}

    def micro_batch_start(self, step: int, k: int) -> int:
        """First sample of this rank's k-th micro-batch of ``step``: step s covers samples
        [(s-1)*B, s*B), its global micro-batch j covers [.. + j*m, .. + (j+1)*m), and DP
        rank r runs j = k*dp + r."""
        t, d = self.cfg.train, self.dist
        return (step - 1) * t.global_batch + (k * d.dp + d.dp_rank) * t.micro_batch

    def eval_starts(self) -> list[int]:
        """This rank's held-out micro-batches: the first eval_iters global batches, whatever
        the DP size or micro-batch."""
        t, d = self.cfg.train, self.dist
        n = t.eval_iters * t.global_batch // t.micro_batch
        return [j * t.micro_batch for j in range(d.dp_rank, n, d.dp)]

    def param_groups(self, model) -> list[dict]:
        """Optimizer groups of ``model``: by canonical name, with the pool layers' Adam step
        offsets and the stage's apollo.update_scale multiplier (engine.param_groups)."""
        return param_groups(self.canonical(model), self.cfg.train.weight_decay,
                            self.step_offsets, pool_lr_scale(self.cfg, model.n_unique))

    def build(self, n_unique: int, state: dict | None = None, step: int = 0,
              step_offsets: list[int] | None = None) -> None:
        """Model and engine for a pool of ``n_unique`` layers; with ``state`` (canonical name
        -> full fp32 param and moments), the engine starts from it at optimizer step
        ``step``. ``step_offsets`` (one per pool layer, default 0): pool layer i's Adam step
        count is step - offsets[i]; a resumed run passes the recorded ones, so it rebuilds the
        same parameter groups as the checkpoint's."""
        offsets = list(step_offsets) if step_offsets is not None else [0] * n_unique
        if len(offsets) != n_unique:
            raise ValueError(f"{len(offsets)} Adam step offsets for {n_unique} pool layers")
        self.step_offsets = offsets
        model = self.new_model(n_unique)
        if not self.partitioned:   # zero.Init placed the partitions already
            model.to(self.dist.device)
        self.model, self.engine = model, self._make_engine(model)
        nonfinite.install(self.engine, self)
        if state is not None:
            self.prime()
            self.load_full_state(state, step)

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: the model is built partitioned (``deepspeed.zero.Init``), never whole."""
        return zero_stage(self.ds_config) == 3

    def prime(self) -> None:
        """The lr=0 step that creates a fresh engine's Adam state (state.priming)."""
        with priming(self.engine):
            self._prime_step()

    def full_state(self) -> tuple[dict, int]:
        """(canonical name -> full fp32 {"param", "exp_avg", "exp_avg_sq"}, optimizer step)
        of this rank's parameters (collective). It holds the whole model's state on every
        rank: for tests and small exports only; expansion streams (``shard_source``)."""
        return read_state(self.engine, self.named_parameters()), optimizer_step_count(self.engine)

    def load_full_state(self, state, step: int) -> None:
        """Write ``state`` (a Mapping read one name at a time) into the primed engine."""
        write_state(self.engine, self.named_parameters(), state, step)

    def shard_source(self) -> ShardSource:
        """This rank's own fragments of the engine's fp32 state, readable one parameter at a
        time once the engine is destroyed (collective)."""
        from megatron.core import parallel_state as ps
        pp_group = ps.get_pipeline_model_parallel_group() if self.dist.pp > 1 else None
        return ShardSource.of(self.engine, self.named_parameters(), self.dist,
                              ps.get_data_parallel_group(), pp_group)

    def tp_layout(self) -> dict:
        """<rest> of each pool tensor -> its tensor-parallel partition dim (None: replicated)."""
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("pool."):
                tp = getattr(p, "tensor_model_parallel", False) and self.dist.tp > 1
                out[name.split(".", 2)[2]] = p.partition_dim if tp else None
        return out

    def full_tensor_std(self, state: dict, names, layout: dict) -> dict:
        """std of the FULL (TP-unsharded) tensor of every pool name in ``names``: sums over
        the tensor-parallel shards (collective over the TP group, every rank the same)."""
        names = sorted(n for n in names if n.startswith("pool."))
        sums = {n: [state[n]["param"].double().sum(), state[n]["param"].double().pow(2).sum(),
                    float(state[n]["param"].numel())] for n in names}
        split = [n for n in names if layout.get(n.split(".", 2)[2]) is not None]
        if self.dist.tp > 1 and split:
            from megatron.core import parallel_state
            red = all_reduce([v for n in split for v in sums[n]],
                             group=parallel_state.get_tensor_model_parallel_group()).tolist()
            for j, n in enumerate(split):
                sums[n] = red[3 * j: 3 * j + 3]
        out = {}
        for n in names:
            s1, s2, c = (float(v) for v in sums[n])
            out[n] = max(0.0, (s2 - s1 * s1 / c) / max(c - 1.0, 1.0)) ** 0.5
        return out

    def destroy(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.model = self.engine = None
        gc.collect()
        if self.dist.on_cuda:
            torch.cuda.empty_cache()


class DataParallelRuntime(Runtime):
    """PoolGPT under data parallelism, TP (megatron-core layers) and ZeRO 0-3."""

    def new_model(self, n_unique: int) -> PoolGPT:
        m = self.cfg.model
        gather = None
        if self.partitioned:
            # ZeRO-3: every parameter is partitioned over the data-parallel group as soon as
            # its module is built; the layout-independent init then writes one gathered
            # parameter at a time.
            import deepspeed
            from megatron.core import parallel_state as ps
            with deepspeed.zero.Init(data_parallel_group=ps.get_data_parallel_group(),
                                     config_dict_or_path=self.ds_config, mpu=MegatronMPU()):
                model = PoolGPT(m, n_unique, dtype=torch.float32, recompute=self.recompute)

            def gather(p):
                return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        else:
            model = PoolGPT(m, n_unique, dtype=torch.float32, recompute=self.recompute)
        init_weights(model, self.cfg.train.seed, m.init_std, m.layers, m.vocab_size,
                     gather=gather)
        return model

    def canonical(self, model):
        return model.named_parameters()

    def _make_engine(self, model):
        return build_engine(model, self.ds_config, self.cfg, MegatronMPU(), self.dist,
                            groups=self.param_groups(model))

    def _prime_step(self) -> None:
        n = self.model.n_unique
        # the training micro-batch's shape: compiled blocks (train.compile) see no new shape
        tokens = torch.zeros(self.cfg.train.micro_batch, self.cfg.model.seq_len,
                             dtype=torch.long, device=self.dist.device)
        self.engine.set_gradient_accumulation_boundary(True)
        loss = self.engine(tokens, layer_map(n, n), tokens, None) * 0.0
        self.engine.backward(loss)
        self.engine.step()
        self.engine.set_gradient_accumulation_boundary(None)

    def run_step(self, step: int, plan, guard=None) -> torch.Tensor:
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        self._loss_sum, self.step_guard = loss_sum, guard
        nxt = self.batch(self.train_ds, self.micro_batch_start(step, 0))
        try:
            for k in range(self.grad_accum):
                b = nxt
                if k + 1 < self.grad_accum:  # queue the next copy before this compute
                    nxt = self.batch(self.train_ds, self.micro_batch_start(step, k + 1))
                loss = self.engine(b["tokens"], plan[k][1], b["labels"], b["loss_mask"])
                loss = faults.loss(loss, step)
                loss_sum += loss.detach().float()
                self.engine.backward(loss)
                self.engine.step()   # the optimizer step (guarded) after the last one
        finally:
            self.step_guard = None
        return loss_sum

    def step_loss_share(self) -> torch.Tensor:
        # every rank of a TP group holds the same loss, hence / world (= dp * tp)
        return self._loss_sum / (self.grad_accum * self.dist.world)

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.valid_ds is None:
            return float("nan")
        lmap = layer_map(self.model.n_unique, self.cfg.model.layers, self.cfg.apollo.grow)
        self.engine.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        starts = self.eval_starts()
        for s in starts:
            b = self.batch(self.valid_ds, s)
            total += self.engine(b["tokens"], lmap, b["labels"], b["loss_mask"]).double()
        self.engine.train()
        acc = all_reduce([total, len(starts)], group=self._dp_group())
        s, n = acc.tolist()
        return s / n

    @staticmethod
    def _dp_group():
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_group()

    def full_weights(self) -> dict:
        from apollo_ds.training.full_state import full_state_dict
        return full_state_dict(self.model, self.cfg.model.vocab_size)


def make_runtime(cfg, dist, ds_config, train_ds, valid_ds) -> Runtime:
    if dist.pp > 1:
        from apollo_ds.training.pipeline_runtime import PipelineRuntime
        return PipelineRuntime(cfg, dist, ds_config, train_ds, valid_ds)
    return DataParallelRuntime(cfg, dist, ds_config, train_ds, valid_ds)
