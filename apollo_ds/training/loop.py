"""The training loop: one place that runs steps, expansions, evaluation, checkpoints and
metrics. Data order is driven by one global consumed-samples counter: step s covers samples
[(s-1)*B, s*B), its global micro-batch j covers [.. + j*m, .. + (j+1)*m), and data-parallel
rank r runs micro-batches j = k*dp + r. Every rank derives the Apollo plan of every micro-batch
itself (a pure function of seed, step, micro-batch index and stage)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict

import torch
from megatron.core import parallel_state

from apollo_ds.apollo import StageSchedule, layer_map
from apollo_ds.config import RunConfig
from apollo_ds.data import build_datasets, get_micro_batch
from apollo_ds.distributed import Dist, MegatronMPU
from apollo_ds.flops import train_flops
from apollo_ds.model import PoolGPT, init_weights
from apollo_ds.training import checkpoint
from apollo_ds.training.engine import (build_engine, load_ds_config, lr_at, model_dtype,
                                       set_lr, zero_stage)
from apollo_ds.training.metrics import MetricsLog, print0


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        t = cfg.train
        self.schedule = StageSchedule(cfg, dist.dp)
        self.ds_config = load_ds_config(cfg, dist.dp)
        self.dtype = model_dtype(self.ds_config)
        self.zero = zero_stage(self.ds_config)
        self.mpu = MegatronMPU()
        self.ckpt_dir = os.path.join(t.out_dir, "checkpoints")
        self.grad_accum = t.global_batch // (t.micro_batch * dist.dp)
        self.dp_group = parallel_state.get_data_parallel_group()
        valid_samples = t.eval_iters * t.global_batch
        self.train_ds, self.valid_ds = build_datasets(cfg, t.steps * t.global_batch,
                                                      valid_samples)
        found = checkpoint.find_latest(self.ckpt_dir)
        self.step, self.consumed, self.flops_spent, self.flops_full = 0, 0, 0.0, 0.0
        self.wall_before = 0.0      # wall seconds spent by earlier (resumed-from) processes
        n_unique = self.schedule.unique_at(1)
        if found is not None:
            tag, state = found
            checkpoint.check_compatible(state, cfg.model, dist.tp, dist.pp,
                                        os.path.join(self.ckpt_dir, tag))
            n_unique = state["n_unique"]
        self.model, self.engine = self.build(n_unique)
        if found is not None:
            checkpoint.load(self.engine, self.ckpt_dir, tag)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            self.flops_spent, self.flops_full = state["flops_spent"], state["flops_full"]
            self.wall_before = state.get("wall_s", 0.0)
            print0(dist.rank, f"resumed from {os.path.join(self.ckpt_dir, tag)} at step "
                              f"{self.step} with {n_unique} unique layers")
        self.metrics = MetricsLog(t.out_dir, dist.rank == 0, resume_step=self.step)
        self._stop_signal = False
        self.t_start = time.perf_counter()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # ---------------------------------------------------------------- building blocks
    def new_model(self, n_unique: int) -> PoolGPT:
        if self.dist.pp > 1:
            from apollo_ds.model import pipeline
            return pipeline.new_model(self, n_unique)
        m = self.cfg.model
        model = PoolGPT(m, n_unique, dtype=torch.float32)
        init_weights(model, self.cfg.train.seed, m.init_std, m.layers, m.vocab_size)
        return model

    def build(self, n_unique: int, model: PoolGPT | None = None):
        if self.dist.pp > 1:
            from apollo_ds.model import pipeline
            return pipeline.build(self, n_unique, model)
        model = model if model is not None else self.new_model(n_unique)
        model.to(self.dist.device)
        engine = build_engine(model, self.ds_config, self.cfg, self.mpu)
        return model, engine

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    def _on_signal(self, signum, _frame):
        # Slurm --signal / preemption: finish this step, checkpoint, exit 0.
        self._stop_signal = True

    def _all_ranks_any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.dist.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _batch(self, ds, start: int) -> dict:
        b = get_micro_batch(ds, start, self.cfg.train.micro_batch)
        return {k: v.to(self.dist.device) for k, v in b.items()}

    def _run_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed,
                "n_unique": self.model.n_unique,
                "stage": self.schedule.stage_index(max(1, self.step)),
                "flops_spent": self.flops_spent, "flops_full": self.flops_full,
                "wall_s": self._wall(),
                "tp": self.dist.tp, "pp": self.dist.pp, "dp": self.dist.dp,
                "model": asdict(self.cfg.model), "apollo": asdict(self.cfg.apollo),
                "data": {"tokenizer": os.path.abspath(self.cfg.data.tokenizer)}}

    def _check_plan(self, step: int, plan) -> None:
        # Each rank also records its own plan, so a test (or a user) can compare them.
        path = os.path.join(self.cfg.train.out_dir, "plans", f"rank{self.dist.rank}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "plan": plan}) + "\n")
        digest = hashlib.sha256(json.dumps(plan).encode()).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little") & ((1 << 62) - 1)],
                            dtype=torch.int64)
        lo, hi = mine.clone(), mine.clone()
        torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError(f"step {step}: ranks disagree on the Apollo depth plan")

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, step: int) -> dict:
        cfg, d = self.cfg, self.dist
        t = cfg.train
        plan = self.schedule.plan(step)
        if t.check_plan_agreement:
            self._check_plan(step, plan)
        # Dropout randomness is a function of (seed, step, rank): exact resume needs no
        # saved RNG state.
        torch.manual_seed((t.seed * 1_000_003 + step) * 4099 + d.rank)
        lr = lr_at(step, cfg)
        set_lr(self.engine, lr)
        t0 = time.perf_counter()
        loss_sum = torch.zeros(1, dtype=torch.float64)
        if d.pp > 1:
            from apollo_ds.model import pipeline
            loss_sum += pipeline.run_micro_batches(self, step, plan)
        else:
            self._run_micro_batches(step, plan, loss_sum)
        torch.distributed.all_reduce(loss_sum, group=self.dp_group)
        elapsed = time.perf_counter() - t0
        tokens = t.global_batch * cfg.model.seq_len
        depths = [p[0] for p in plan]
        mb_tokens = t.micro_batch * d.dp * cfg.model.seq_len
        flops = sum(train_flops(cfg.model, dd, mb_tokens, d.tp) for dd in depths)
        full = train_flops(cfg.model, cfg.model.layers, tokens, d.tp)
        self.flops_spent += flops
        self.flops_full += full
        grad_norm = self.engine.get_global_grad_norm()
        return {"step": step, "loss": loss_sum.item() / (self.grad_accum * d.dp), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "n_unique": self.model.n_unique, "depths": depths,
                "layer_maps": [p[1] for p in plan], "tokens": tokens,
                "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                "flops": flops, "full_depth_flops": full, "flops_per_s": flops / elapsed,
                "cum_flops": self.flops_spent, "cum_full_depth_flops": self.flops_full,
                "consumed_samples": self.consumed + t.global_batch}

    def _run_micro_batches(self, step: int, plan, loss_sum: torch.Tensor) -> None:
        """Forward/backward of this rank's micro-batches; the engine steps at the last."""
        d, t = self.dist, self.cfg.train
        base = (step - 1) * t.global_batch
        for k in range(self.grad_accum):
            j = k * d.dp + d.dp_rank
            _, lmap = plan[k]
            batch = self._batch(self.train_ds, base + j * t.micro_batch)
            loss = self.engine(batch["tokens"], lmap, batch["labels"], batch["loss_mask"])
            loss_sum += loss.detach().double().cpu()
            if k == self.grad_accum - 1 and self._all_ranks_any(not torch.isfinite(loss_sum).all()):
                raise NonFiniteLoss(
                    f"non-finite loss at step {step} (depths {[p[0] for p in plan]}, samples "
                    f"{base}..{base + t.global_batch - 1}); the last checkpoint is the last "
                    f"good state: lower train.lr or check the data")
            self.engine.backward(loss)
            self.engine.step()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first train.eval_iters global batches of held-out samples, at
        full depth L; the same samples whatever the DP size or micro-batch."""
        cfg, d, t = self.cfg, self.dist, self.cfg.train
        if d.pp > 1:
            from apollo_ds.model import pipeline
            return pipeline.evaluate(self)
        if self.valid_ds is None:
            return float("nan")
        lmap = layer_map(self.model.n_unique, cfg.model.layers, cfg.apollo.grow)
        self.engine.eval()
        acc = torch.zeros(2, dtype=torch.float64)
        for j in range(d.dp_rank, t.eval_iters * t.global_batch // t.micro_batch, d.dp):
            b = self._batch(self.valid_ds, j * t.micro_batch)
            acc[0] += self.engine(b["tokens"], lmap, b["labels"], b["loss_mask"]).double().cpu()
            acc[1] += 1
        self.engine.train()
        torch.distributed.all_reduce(acc, group=self.dp_group)
        return (acc[0] / acc[1]).item()

    def expand(self, n_new: int) -> None:
        if self.dist.pp > 1:
            from apollo_ds.model.pipeline import expand as expand_engine
        else:
            from apollo_ds.apollo.expand import expand_engine
        t0 = time.perf_counter()
        n_old = self.model.n_unique
        self.model, self.engine = expand_engine(self, n_new)
        print0(self.dist.rank, f"expanded pool {n_old} -> {n_new} unique layers "
                               f"({self.cfg.apollo.grow}, optimizer state "
                               f"{self.cfg.apollo.optimizer_state}) in "
                               f"{time.perf_counter() - t0:.1f}s")

    def save(self) -> None:
        tag = checkpoint.save(self.engine, self.ckpt_dir, self._run_state(), self.dist.rank)
        print0(self.dist.rank, f"saved checkpoint {os.path.join(self.ckpt_dir, tag)}")

    # ---------------------------------------------------------------- the run
    def run(self) -> dict:
        d, t = self.dist, self.cfg.train
        last = {}
        window = []
        if self.step >= t.steps:
            print0(d.rank, f"nothing to do: already at step {self.step}/{t.steps} "
                           f"({self.ckpt_dir})")
            self.metrics.close()
            return last
        while self.step < t.steps:
            s = self.step + 1
            n_needed = self.schedule.unique_at(s)
            if n_needed > self.model.n_unique:
                self.expand(n_needed)
            try:
                rec = self.train_step(s)
            except NonFiniteLoss as e:
                print0(d.rank, f"error: {e}")
                raise
            self.step, self.consumed = s, rec["consumed_samples"]
            window.append(rec)
            final = s == t.steps or s == t.stop_after
            if (t.eval_interval and s % t.eval_interval == 0) or final:
                rec["eval_loss"] = self.evaluate()
            rec["wall_s"] = self._wall()
            self.metrics.write(rec)
            last = rec
            if s % t.log_interval == 0 or final or "eval_loss" in rec:
                self._log_line(window, rec)
                window = []
            stop = self._all_ranks_any(self._stop_signal)
            if (t.save_interval and s % t.save_interval == 0) or final or stop:
                self.save()
            if stop or s == t.stop_after:
                print0(d.rank, f"stopping after step {s}"
                               f"{' (signal)' if stop else ''}; rerun the same command to resume")
                break
        self.metrics.close()
        saving = 1 - self.flops_spent / self.flops_full if self.flops_full else 0.0
        print0(d.rank, f"done: step {self.step}/{t.steps} | FLOPs spent {self.flops_spent:.3e} "
                       f"vs full-depth {self.flops_full:.3e} ({100 * saving:.1f}% saved) | "
                       f"final eval loss {last.get('eval_loss', float('nan')):.4f}")
        return last

    def _log_line(self, window: list[dict], rec: dict) -> None:
        secs = sum(r["step_time_s"] for r in window)
        toks = sum(r["tokens"] for r in window)
        fl = sum(r["flops"] for r in window)
        depths = [dd for r in window for dd in r["depths"]]
        line = (f"step {rec['step']:>6}/{self.cfg.train.steps} | N {rec['n_unique']} | "
                f"loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | gnorm "
                f"{rec['grad_norm'] if rec['grad_norm'] is None else round(rec['grad_norm'], 3)}"
                f" | depth {sum(depths) / len(depths):.2f} | {toks / secs:,.0f} tok/s | "
                f"{fl / secs / 1e9:.2f} GFLOP/s | FLOPs {rec['cum_flops']:.3e} "
                f"({100 * rec['cum_flops'] / rec['cum_full_depth_flops']:.1f}% of full depth)")
        if "eval_loss" in rec:
            line += f" | eval {rec['eval_loss']:.4f}"
        print0(self.dist.rank, line)
