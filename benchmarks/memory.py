#!/usr/bin/env python3
"""Per-rank memory and checkpoint I/O of the training loop: peak host RSS (and, on CUDA,
torch.cuda.max_memory_allocated) of every rank during each phase, and the save time against
DeepSpeed's own ``save_checkpoint`` of the same state.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory.py [--nproc 4] [--out FILE.json]

One torchrun group of ``--nproc`` ranks (ZeRO-3 fp32 by default, data parallel) trains a GPT of
~110 M parameters (8 layers x hidden 1024, vocabulary 8192) with Apollo growing the pool 4 -> 8
after ``--steps-before`` steps:

  build         Trainer construction (model, engine; ZeRO-3 partitioned from the start)
  train_before  the steps before the expansion (steady training at the small pool)
  expand        Trainer.expand: the streamed, per-parameter growth (training/growth.py)
  train_after   the steps after it (steady training at the full pool: the reference)
  ds_save       engine.save_checkpoint alone (DeepSpeed's files only), timed
  save          Trainer.save: the run's checkpoint, timed
A second group of ``--resume-nproc`` ranks then resumes that checkpoint under another layout:
  resume        Trainer construction from the checkpoint under the new layout (each rank
                reads the byte ranges it owns; their count is printed, APOLLO_LOAD_PROFILE)
  train_resumed one step after it (that layout's steady reference)

RSS is sampled every 5 ms by a thread reading /proc/self/statm; a phase's peak is the most seen
between two barriers. Times are rank 0's between barriers. The table prints each phase's peak
RSS (max and min over ranks) and its ratio to the rank's steady training peak.
The demo data are not needed: the text, tokenizer and indexed dataset are built offline
(benchmarks/offline_data.py) in ``--work``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PAGE = os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident set size of this process, sampled by a daemon thread."""

    def __init__(self, interval: float = 0.005):
        self.peak, self.interval = 0, interval
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = self.now()


def worker(args) -> int:
    import torch

    from apollo_ds import distributed
    from apollo_ds.config import load_config, validate
    from apollo_ds.training.loop import Trainer

    rss = RSSPeak()
    cfg = validate(load_config(args.config, args.overrides))
    dist = distributed.init(cfg.parallel.tp, cfg.parallel.pp)
    validate(cfg, world_size=dist.world)
    cuda = torch.cuda.is_available() and dist.on_cuda
    rec = {"rank": dist.rank, "phases": {}, "times": {}}

    @contextmanager
    def phase(name):
        distributed.barrier()
        rss.reset()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        distributed.barrier()
        rec["times"][name] = rec["times"].get(name, 0.0) + time.perf_counter() - t0
        time.sleep(0.02)   # one more sample after the barrier
        p = rec["phases"].setdefault(name, {"rss": 0, "cuda": 0})
        p["rss"] = max(p["rss"], rss.peak)
        if cuda:
            p["cuda"] = max(p["cuda"], torch.cuda.max_memory_allocated())

    with phase("resume" if args.worker == "resume" else "build"):
        tr = Trainer(cfg, dist)
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                 for _, p in tr.runtime.named_parameters())
    if args.worker == "resume":
        with phase("train_resumed"):
            tr.train_step(tr.step + 1)
    else:
        boundary = tr.schedule.end_step(0)
        for s in range(1, boundary + 1):
            with phase("train_before"):
                tr.train_step(s)
            tr.step = s
        with phase("expand"):
            tr.expand(tr.schedule.unique_at(boundary + 1))
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                     for _, p in tr.runtime.named_parameters())
        for s in range(boundary + 1, cfg.train.steps):   # the last step is the resumed run's
            with phase("train_after"):
                tr.train_step(s)
            tr.step = s
        ds_only = os.path.join(cfg.train.out_dir, "ds_only")
        with phase("ds_save"):
            tr.engine.save_checkpoint(ds_only, tag="alone")
        if dist.rank == 0:   # only its time matters (its zero_to_fp32.py would linger)
            import shutil
            shutil.rmtree(ds_only, ignore_errors=True)
        with phase("save"):
            tr.save()
    rec["params_per_tp_rank"] = params
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, rec)
    if dist.rank == 0:
        with open(args.result, "w") as f:
            json.dump(out, f)
    distributed.shutdown()
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, mode: str, config: str, result: str, overrides: list[str]) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.abspath(__file__), "--worker", mode,
           "--config", config, "--result", result, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"memory.py: {mode} group failed ({r.returncode}):\n"
                         f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    with open(result) as f:
        return json.load(f)


def table(runs: dict, steady: dict) -> list[str]:
    """One line per phase: peak RSS (MB) max/min over ranks, the worst rank's ratio to its own
    steady training peak, rank 0's time."""
    lines = [f"{'phase':<14} {'ranks':>5} {'peak RSS MB max':>16} {'min':>7} "
             f"{'/ steady (worst)':>17} {'CUDA MB':>8} {'time s':>8}"]
    for group, recs in runs.items():
        for name in recs[0]["phases"]:
            peaks = [r["phases"][name]["rss"] / 2**20 for r in recs]
            ratio = max(r["phases"][name]["rss"] / r["phases"][steady[group]]["rss"]
                        for r in recs)
            cuda = max(r["phases"][name]["cuda"] for r in recs) / 2**20
            lines.append(f"{name:<14} {len(recs):>5} {max(peaks):>16.0f} {min(peaks):>7.0f} "
                         f"{ratio:>17.2f} {cuda:>8.0f} {recs[0]['times'][name]:>8.2f}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=["train", "resume"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--resume-nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--steps-before", type=int, default=2)
    p.add_argument("--steps-after", type=int, default=2)
    p.add_argument("--deepspeed-config", default="ds_configs/zero3_fp32.json")
    p.add_argument("--work", default=os.path.join(REPO, "runs", "memory_bench"))
    p.add_argument("--out", default=None, help="write the per-rank records and table as JSON")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.worker:
        return worker(args)

    import shutil

    import yaml

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from offline_data import make_data
    data = make_data(args.work, 8192, 3000)
    out_dir = os.path.join(args.work, "run")
    shutil.rmtree(out_dir, ignore_errors=True)
    n, L = args.nproc, args.layers
    cfg = {"model": {"layers": L, "hidden": args.hidden, "heads": args.heads,
                     "seq_len": args.seq_len, "vocab_size": 8192},
           "apollo": {"enabled": True, "stages": [L // 2, L],
                      "stage_ends": [args.steps_before], "sampler": "constant_high"},
           "data": {"prefix": data["prefix"], "tokenizer": data["tokenizer"]},
           "train": {"steps": args.steps_before + args.steps_after + 1, "micro_batch": 1,
                     "global_batch": n, "lr": 1e-4, "warmup": 0, "eval_interval": 0,
                     "eval_iters": 1, "save_interval": 0, "log_interval": 1,
                     "out_dir": out_dir, "deepspeed_config": args.deepspeed_config}}
    config = os.path.join(args.work, "memory.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    t0 = time.perf_counter()
    runs = {"train": launch(n, "train", config, os.path.join(args.work, "train.json"),
                            args.overrides)}
    load_profile = os.path.join(args.work, "load_profile.jsonl")
    if os.path.exists(load_profile):
        os.remove(load_profile)
    os.environ["APOLLO_LOAD_PROFILE"] = load_profile   # each resuming rank: bytes it read
    runs["resume"] = launch(args.resume_nproc, "resume", config,
                            os.path.join(args.work, "resume.json"),
                            args.overrides)
    del os.environ["APOLLO_LOAD_PROFILE"]
    with open(load_profile) as f:
        reads = sorted((json.loads(line) for line in f), key=lambda r: r["rank"])
    lines = table(runs, {"train": "train_after", "resume": "train_resumed"})
    tr = runs["train"]
    params = tr[0]["params_per_tp_rank"]
    ratio = tr[0]["times"]["save"] / tr[0]["times"]["ds_save"]
    worst = {k: max(r["phases"][k]["rss"] / r["phases"]["train_after"]["rss"] for r in tr)
             for k in ("expand", "save")}
    lines += [f"model: {params / 1e6:.1f} M parameters; full fp32 state (master + Adam) "
              f"{12 * params / 2**20:.0f} MB = {n}x one rank's ZeRO shard "
              f"({12 * params / n / 2**20:.0f} MB)",
              f"save time / DeepSpeed save_checkpoint alone: {ratio:.2f} (goal <= 1.5)",
              f"reshaped resume ({n} -> {args.resume_nproc} ranks) read per rank: " + ", ".join(
                  f"{sum(r['read'].values()) / 2**20:.0f} MB (owns {12 * r['owned'] / 2**20:.0f}"
                  f" MB)" for r in reads),
              f"peak RSS / steady training, worst rank: expand {worst['expand']:.2f}, "
              f"save {worst['save']:.2f} (goal <= 1.3)",
              f"wall {time.perf_counter() - t0:.0f} s"]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"runs": runs, "table": lines, "config": cfg, "reads": reads}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
