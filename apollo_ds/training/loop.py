"""The training loop: one place that runs steps, expansions, evaluation, checkpoints and
metrics. Data order is driven by one global consumed-samples counter: step s covers samples
[(s-1)*B, s*B), its global micro-batch j covers [.. + j*m, .. + (j+1)*m), and data-parallel
rank r runs micro-batches j = k*dp + r. Every rank derives the Apollo plan of every micro-batch
itself (a pure function of seed, step, micro-batch index and stage)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import torch
from megatron.core import tensor_parallel

from apollo_ds import rundir
from apollo_ds.apollo import StageSchedule
from apollo_ds.config import ConfigError, RunConfig
from apollo_ds.data import build_datasets
from apollo_ds.distributed import Dist, all_reduce
from apollo_ds.flops import train_flops
from apollo_ds import init_from
from apollo_ds.training import checkpoint, portable, resume, run_log, signals, watchdog
from apollo_ds.training.engine import load_ds_config, lr_at, set_lr, zero_stage
from apollo_ds.training.growth import grow
from apollo_ds.training.metrics import DeviceStats, MetricsLog, print0
from apollo_ds.training.nonfinite import NonFiniteError
from apollo_ds.training.runtime import make_runtime
from apollo_ds.training.state import optimizer_step_count
from apollo_ds.value_checks import checkpoint_bytes, free_bytes

NonFiniteLoss = NonFiniteError   # the old name
EXIT_SAVE = 6


class SaveError(RuntimeError):
    """A checkpoint could not be written (no room, a full disk, permissions); every earlier
    checkpoint and ``latest`` are untouched. ``agreed``: every rank raised it together;
    ``own``: this rank's write failed (it says what and where)."""

    def __init__(self, msg: str, agreed: bool, own: bool = True):
        super().__init__(msg)
        self.agreed, self.own = agreed, own


def step_seed(seed: int, step: int, dp_rank: int, pp_rank: int) -> int:
    """Seed of the default generator for one step: a function of (seed, step) and of the
    ranks whose activations differ (DP, PP), never of the TP rank, so every rank of a TP group
    draws the same dropout masks on the activations they share. Exact resume needs no saved
    RNG state."""
    return ((seed * 1_000_003 + step) * 4099 + dp_rank) * 131 + pp_rank


class Trainer:
    def __init__(self, cfg: RunConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        t = cfg.train
        self.run_log = run_log.RunLog(t.out_dir, dist.rank)   # train.log gets rank 0's stdout
        self.schedule = StageSchedule(cfg, dist.dp)
        self.ds_config = load_ds_config(cfg, dist.dp)
        self.zero = zero_stage(self.ds_config)
        self.ckpt_dir = rundir.checkpoints_dir(t.out_dir)
        self.grad_accum = t.global_batch // (t.micro_batch * dist.dp)
        valid_samples = t.eval_iters * t.global_batch
        self.train_ds, self.valid_ds = build_datasets(cfg, t.steps * t.global_batch,
                                                      valid_samples)
        self.runtime = make_runtime(cfg, dist, self.ds_config, self.train_ds, self.valid_ds)
        found = checkpoint.find_latest(self.ckpt_dir)
        self.step, self.consumed, self.flops_spent, self.flops_full = 0, 0, 0.0, 0.0
        self.wall_before = 0.0      # wall seconds spent by earlier (resumed-from) processes
        self.skipped = self.consecutive_skips = 0   # train.on_nonfinite=skip: steps dropped
        n_unique, offsets = self.schedule.unique_at(1), None
        self.layout = resume.layout_of(dist, self.zero, self.runtime.dtype)
        if found is None and t.init_from:   # weights only, at step 0
            src = init_from.open_source(cfg)
            init_from.check(src, cfg)
            state = init_from.InitState(src, cfg, self.runtime, n_unique)
            self.runtime.build(n_unique, state, 0)
            print0(dist.rank, init_from.describe(src, state.sources, cfg))
        elif found is None:
            self.runtime.build(n_unique)
        else:
            if t.init_from:
                print0(dist.rank, f"train.init_from={t.init_from} is ignored: {t.out_dir} "
                                  f"has a checkpoint, so the run resumes from it")
            tag, state = found
            tag_dir = os.path.join(self.ckpt_dir, tag)
            verdict = resume.check(state, cfg, self.layout, tag_dir)
            for note in verdict.notes:
                print0(dist.rank, note)
            n_unique, offsets = state["n_unique"], state.get("adam_step_offsets")
            if rundir.has_params(tag_dir) and portable.is_fragmented(tag_dir):
                # one copy, any layout: each rank reads the byte ranges it owns
                self.runtime.build(n_unique, step_offsets=offsets)
                self.runtime.prime()
                portable.load(self.runtime, tag_dir, cfg.model.vocab_size)
            elif verdict.same_layout:   # written before the fragment format
                self.runtime.build(n_unique, step_offsets=offsets)
                checkpoint.load(self.engine, self.ckpt_dir, tag)
            else:
                if not rundir.has_params(tag_dir):
                    raise ConfigError(f"checkpoint {tag_dir} has no layout-free state "
                                      f"({rundir.PARAMS}/), so it resumes only under the "
                                      f"layout that wrote it: {state.get('layout')}")
                st = portable.PortableState(tag_dir, cfg.model, dist.tp, dist.tp_rank)
                self.runtime.build(n_unique, st, st.optimizer_step, offsets)
            self.step, self.consumed = state["step"], state["consumed_samples"]
            self.flops_spent, self.flops_full = state["flops_spent"], state["flops_full"]
            self.wall_before = state.get("wall_s", 0.0)
            self.skipped = state.get("skipped_steps", 0)
            self.consecutive_skips = state.get("consecutive_skips", 0)
            print0(dist.rank, f"resumed from {tag_dir} at step {self.step} with {n_unique} "
                              f"unique layers")
        self._settings = resume.record(cfg, self.layout)   # hashes files once, not per save
        self.metrics = MetricsLog(t.out_dir, dist.rank == 0, resume_step=self.step)
        self.metrics.monitor = lambda: getattr(self.engine, "monitor", None)
        self.run_log.start(self)   # banner; config.resolved.yaml before the first step
        self.t_start = time.perf_counter()
        signals.install()   # pretrain.py installed them at process start; kept for library use

    # ---------------------------------------------------------------- building blocks
    @property
    def model(self):
        return self.runtime.model

    @property
    def engine(self):
        return self.runtime.engine

    def close(self) -> None:
        """Flush the metrics and free the engine (for callers that drive train_step)."""
        self.metrics.close()
        self.runtime.destroy()

    def _wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t_start

    @property
    def _stop_signal(self) -> bool:
        # Slurm --signal / preemption: finish this step, checkpoint, exit 0.
        return signals.requested()

    def _run_state(self) -> dict:
        return {"step": self.step, "consumed_samples": self.consumed,
                "n_unique": self.model.n_unique,
                "adam_step_offsets": list(self.runtime.step_offsets),
                "stage": self.schedule.stage_index(max(1, self.step)),
                "flops_spent": self.flops_spent, "flops_full": self.flops_full,
                "wall_s": self._wall(),
                "skipped_steps": self.skipped, "consecutive_skips": self.consecutive_skips,
                **self._settings}

    def _check_plan(self, step: int, plan) -> None:
        # Each rank also records its own plan, so a test (or a user) can compare them.
        path = os.path.join(self.cfg.train.out_dir, "plans", f"rank{self.dist.rank}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "plan": plan}) + "\n")
        digest = hashlib.sha256(json.dumps(plan).encode()).digest()[:6]
        mine = int.from_bytes(digest, "little")   # 48 bits: exact in float64
        lo = all_reduce([-mine], op="max").tolist()[0]
        hi = all_reduce([mine], op="max").tolist()[0]
        if -lo != hi:
            raise RuntimeError(f"step {step}: ranks disagree on the Apollo depth plan")

    def seed_step(self, step: int) -> None:
        """Dropout streams of one step: the default generator (shared by a TP group) and
        megatron-core's model-parallel tracker (its own per TP rank)."""
        d = self.dist
        seed = step_seed(self.cfg.train.seed, step, d.dp_rank, d.pp_rank) % (2 ** 62)
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self, step: int) -> dict:
        cfg, d = self.cfg, self.dist
        t = cfg.train
        plan = self.schedule.plan(step)
        if t.check_plan_agreement:
            self._check_plan(step, plan)
        self.seed_step(step)
        lr = lr_at(step, cfg)
        set_lr(self.engine, lr)
        t0 = time.perf_counter()
        sync = {}

        def guard(loss_share, norm, norm_is_global) -> bool:
            # The step's one host sync, before the optimizer step: loss, gradient norm (or
            # finiteness probe) and the stop flag in one reduction over every rank, so all
            # ranks step or skip together. The global norm is the same on every rank.
            vals = all_reduce([loss_share, norm, float(self._stop_signal)]).tolist()
            sync.update(loss=vals[0], probe=vals[1], stop=vals[2] > 0,
                        norm=vals[1] / d.world if norm_is_global else None)
            return math.isfinite(vals[0]) and math.isfinite(vals[1])

        self.runtime.run_step(step, plan, guard)
        if not sync:
            raise RuntimeError(f"step {step}: the engine never reached its optimizer step")
        loss, grad_norm, self._stop_all = sync["loss"], sync["norm"], sync["stop"]
        elapsed = time.perf_counter() - t0
        depths = [p[0] for p in plan]
        finite = math.isfinite(loss) and math.isfinite(sync["probe"])
        if finite:
            self.consecutive_skips = 0
        else:
            self._nonfinite(step, depths, loss, sync["probe"])   # raises unless skipping
        tokens = t.global_batch * cfg.model.seq_len
        mb_tokens = t.micro_batch * d.dp * cfg.model.seq_len
        flops = sum(train_flops(cfg.model, dd, mb_tokens, d.tp) for dd in depths)
        full = train_flops(cfg.model, cfg.model.layers, tokens, d.tp)
        self.flops_spent += flops
        self.flops_full += full
        rec = {"step": step, "loss": loss if finite else None, "lr": lr,
                "grad_norm": grad_norm if finite else None,
                "n_unique": self.model.n_unique, "depths": depths,
                "layer_maps": [p[1] for p in plan], "tokens": tokens,
                "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                "flops": flops, "full_depth_flops": full, "flops_per_s": flops / elapsed,
                "cum_flops": self.flops_spent, "cum_full_depth_flops": self.flops_full,
                "consumed_samples": self.consumed + t.global_batch,
                "cum_tokens": (self.consumed + t.global_batch) * cfg.model.seq_len}
        if not finite or self.skipped:
            rec.update(skipped=not finite, skipped_steps=self.skipped)
        return rec

    def _nonfinite(self, step: int, depths: list[int], loss: float, probe: float) -> None:
        """A step whose loss or gradient norm is not finite; its optimizer update was not
        applied (nonfinite.py). train.on_nonfinite=skip: count it and go on, unless that makes
        more than train.max_skipped in a row; otherwise raise NonFiniteError."""
        t = self.cfg.train
        what = [f"loss {loss}"] if not math.isfinite(loss) else []
        if not math.isfinite(probe):
            what.append(f"gradient norm {probe}")
        base = (step - 1) * t.global_batch
        where = (f"at step {step} (depths {depths}, samples {base}..{base + t.global_batch - 1})")
        if t.on_nonfinite == "skip" and self.consecutive_skips < t.max_skipped:
            self.consecutive_skips += 1
            self.skipped += 1
            print0(self.dist.rank, f"warning: non-finite {' and '.join(what)} {where}: step "
                                   f"skipped ({self.consecutive_skips} in a row, "
                                   f"train.max_skipped={t.max_skipped})")
            return
        latest = rundir.read_latest(self.ckpt_dir)
        if latest:
            good = (f"the newest checkpoint {os.path.join(self.ckpt_dir, latest)} is the last "
                    f"good state, untouched (rerun resumes from it)")
        else:
            good = f"no checkpoint was written yet in {self.ckpt_dir}"
        head = (f"non-finite {' and '.join(what)} {where}" if t.on_nonfinite == "stop" else
                f"{self.consecutive_skips + 1} non-finite steps in a row, the last "
                f"({' and '.join(what)}) {where}, more than train.max_skipped={t.max_skipped}")
        raise NonFiniteError(
            f"{head}; stopped before its optimizer step and saved nothing: {good}; lower "
            f"train.lr, check those samples, or set train.on_nonfinite=skip / raise "
            f"train.max_skipped")

    def evaluate(self) -> float:
        """Mean loss over the first train.eval_iters global batches of held-out samples, at
        full depth L; the same samples whatever the DP size or micro-batch."""
        return self.runtime.evaluate()

    def expand(self, n_new: int) -> None:
        """Grow the pool: a new engine for the larger pool, its state streamed from the old
        engine's shards one parameter at a time (training/growth.py)."""
        t0 = time.perf_counter()
        rt, a = self.runtime, self.cfg.apollo
        n_old = rt.n_unique
        step = optimizer_step_count(self.engine)
        grow(rt, self.cfg, n_new, step, self.schedule.stage_index(step + 1))
        print0(self.dist.rank, f"expanded pool {n_old} -> {n_new} unique layers "
                               f"({a.grow}, optimizer state {a.optimizer_state}) in "
                               f"{time.perf_counter() - t0:.1f}s")

    def save(self) -> None:
        """Write a checkpoint. Not enough room (agreed by all ranks before anything is written)
        or a failing write raise SaveError: earlier checkpoints and ``latest`` stay as they
        were, and the half-written tag has no manifest, so it is never loaded."""
        step, tag = self.step, rundir.tag_for(self.step)
        kept = (f"the earlier checkpoints and {rundir.LATEST} "
                f"({rundir.read_latest(self.ckpt_dir) or 'none yet'}) are intact")
        need = checkpoint_bytes(self.cfg, self.runtime.dtype == torch.bfloat16,
                                layers=self.model.n_unique)
        free = free_bytes(self.ckpt_dir)
        if all_reduce([float(free < need)], op="max").tolist()[0] > 0:
            raise SaveError(f"not enough room for the checkpoint of step {step} in "
                            f"{self.ckpt_dir}: {free / 2**20:,.1f} MiB free on some rank, about "
                            f"{need / 2**20:,.1f} MiB needed; nothing was written and {kept}; "
                            f"free space there and rerun the same command to resume", True,
                            self.dist.rank == 0)
        try:
            checkpoint.save(
                self.ckpt_dir, self._run_state(), self.dist.rank,
                lambda tag_dir: portable.write(self.runtime, tag_dir, self.cfg.model.vocab_size),
                keep=self.cfg.train.keep_checkpoints)
        except OSError as e:
            # WriteError: raised on every rank together; only the failing ranks say why
            agreed = isinstance(e, checkpoint.WriteError)
            own = e.own if agreed else True
            cause = (e.cause if agreed else e) or e
            where = cause.filename or self.ckpt_dir
            raise SaveError(f"rank {self.dist.rank}: saving the checkpoint of step {step} "
                            f"failed: {cause.strerror or cause} ({where}); {kept} ({tag} has "
                            f"no manifest and is never loaded); free space or fix permissions "
                            f"in {self.ckpt_dir}, then rerun the same command to resume",
                            agreed, own) from None
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
        if all_reduce([float(self._stop_signal)], op="max").tolist()[0] > 0:
            # a stop request during start-up (build, load): nothing new to save
            print0(d.rank, f"stopping before step {self.step + 1} ({signals.names() or 'signal'}"
                           f" during start-up); rerun the same command to resume")
            self.metrics.close()
            return last
        while self.step < t.steps:
            s = self.step + 1
            n_needed = self.schedule.unique_at(s)
            if n_needed > self.model.n_unique:
                watchdog.progress(f"expansion before step {s}")
                self.expand(n_needed)
            watchdog.progress(f"step {s}")
            try:
                rec = self.train_step(s)
            except NonFiniteError:
                self.metrics.close()   # pretrain.py prints the message and exits 3
                raise
            self.step, self.consumed = s, rec["consumed_samples"]
            window.append(rec)
            final = s == t.steps or s == t.stop_after
            if (t.eval_interval and s % t.eval_interval == 0) or final:
                watchdog.progress(f"evaluation after step {s}")
                rec["eval_loss"] = self.evaluate()
            rec["wall_s"] = self._wall()
            self.metrics.write(rec)
            last = rec
            if s % t.log_interval == 0 or final or "eval_loss" in rec:
                self._log_line(window, rec)
                window = []
            stop = self._stop_all
            if (t.save_interval and s % t.save_interval == 0) or final or stop:
                watchdog.progress(f"checkpoint save after step {s}")
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
        loss = "skipped" if rec.get("skipped") else f"{rec['loss']:.4f}"
        line = (f"step {rec['step']:>6}/{self.cfg.train.steps} | N {rec['n_unique']} | "
                f"loss {loss} | lr {rec['lr']:.2e} | gnorm "
                f"{rec['grad_norm'] if rec['grad_norm'] is None else round(rec['grad_norm'], 3)}"
                f" | depth {sum(depths) / len(depths):.2f} | {toks / secs:,.0f} tok/s | "
                f"{fl / secs / 1e9:.2f} GFLOP/s | FLOPs {rec['cum_flops']:.3e} "
                f"({100 * rec['cum_flops'] / rec['cum_full_depth_flops']:.1f}% of full depth)")
        # per device: model TFLOP/s, MFU against the card's peak, peak memory
        if getattr(self, "_device_stats", None) is None:
            self._device_stats = DeviceStats(self.dist.device)
        line += " | " + self._device_stats.text(fl / secs, self.dist.world)
        if "eval_loss" in rec:
            line += f" | eval {rec['eval_loss']:.4f}"
        line += self.run_log.clock(rec["step"], self.cfg.train.steps, rec["wall_s"])
        print0(self.dist.rank, line)
