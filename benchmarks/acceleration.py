#!/usr/bin/env python3
"""Does Apollo reach the from-scratch loss with fewer FLOPs / less wall time? (apollo.md metric)

    .venv/bin/python benchmarks/acceleration.py [--quick] [--out DIR] [--lr-sweep]
        [--data-prefix P --tokenizer T] [--nproc auto|1|2] [--steps N] [--lr LR]

Trains, on the same data, model, batch, steps, seed and LR schedule, one after another, each
as a real ``python -m torch.distributed.run --nproc_per_node N apollo_ds/pretrain.py --config
<generated yaml>`` subprocess:
  scratch        apollo.enabled=false (full depth L from step 0)
  apollo_copy    Apollo: LVPS sampler, interpolation growth, optimizer_state=copy
  apollo_reset   the same with optimizer_state=reset (fresh Adam moments for every layer)
  stack          progressive stacking: grow=stack, sampler=constant_low (depth = unique count),
                 optimizer_state=copy
Stages 1,3,6,12 unique layers ending at 5%, 10%, 25% of the run (the release's proportions).

Each run writes DIR/runs/<name>/metrics.jsonl (one record per step: step, loss, cum_flops,
cum_full_depth_flops, wall_s, eval_loss on evaluation steps). From those this script reports,
per method: final eval loss; FLOPs and wall seconds to first reach scratch's final eval loss
(first evaluation at or below it, and linearly interpolated between evaluations), or 'not
reached' with the ratios at its end; ratios to scratch and the saving 1 - method/scratch.
Writes DIR/acceleration.json, DIR/eval_loss_vs_flops.png, DIR/eval_loss_vs_wall.png.

--lr-sweep first trains scratch at 2-3 learning rates for --sweep-steps (default steps/3) and
keeps the one with the best final eval loss; every method then uses it. --nproc auto times a
few full-depth steps at 1 and 2 processes and uses the faster. The default model (12 layers x
hidden 128, 1024-token SentencePiece vocabulary trained here on the demo corpus) keeps the LM
head to a few percent of the FLOPs, so depth-based savings are not capped by it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
CORPUS_TXT = ".cache/apollo_ds/data/corpus.txt"
CACHE = ".cache/apollo_ds/bench"
REQUIRED = ("step", "loss", "cum_flops", "cum_full_depth_flops", "wall_s")

METHODS = {
    "scratch": {"enabled": False},
    "apollo_copy": {"enabled": True, "sampler": "lvps", "grow": "interpolate",
                    "optimizer_state": "copy"},
    "apollo_reset": {"enabled": True, "sampler": "lvps", "grow": "interpolate",
                     "optimizer_state": "reset"},
    "stack": {"enabled": True, "sampler": "constant_low", "grow": "stack",
              "optimizer_state": "copy"},
}


# ----------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 6 layers x 64, stages 1,2,3,6, 40 steps (a few minutes)")
    p.add_argument("--out", default="runs/acceleration", help="output directory")
    p.add_argument("--data-prefix", default=None,
                   help="indexed dataset prefix; default: the demo corpus re-tokenized with a "
                        "--vocab-size SentencePiece model (built once into --cache-dir)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model of --data-prefix")
    p.add_argument("--corpus-text", default=CORPUS_TXT,
                   help="text to build the default tokenizer and dataset from")
    p.add_argument("--vocab-size", type=int, default=1024,
                   help="vocabulary of the tokenizer built when --data-prefix is not given")
    p.add_argument("--cache-dir", default=CACHE, help="tokenizer, dataset and index cache")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list from {','.join(METHODS)} (scratch is always run)")
    p.add_argument("--nproc", default=None, choices=("auto", "1", "2"),
                   help="processes per run; auto (the default; --quick: 2): time a few "
                        "full-depth steps at 1 and at 2 processes first and use the faster")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 400; --quick 40)")
    p.add_argument("--layers", type=int, default=None, help="full depth L (default 12)")
    p.add_argument("--hidden", type=int, default=None, help="default 128")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--stages", default=None, help="unique-layer counts, default 1,3,6,12")
    p.add_argument("--stage-ends", default="0.05,0.10,0.25",
                   help="fractions of the run at which each stage but the last ends")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="LR when there is no --lr-sweep")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="min_lr = ratio * lr")
    p.add_argument("--warmup", type=float, default=0.025, help="warm-up fraction")
    p.add_argument("--lr-sweep", nargs="?", const="default", default=None, metavar="LRS",
                   help="scratch LR sweep first (comma list; default 1e-3,2e-3,4e-3, "
                        "--quick 2e-3,4e-3)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of each sweep run (default steps/3; = --steps reuses the best "
                        "sweep run as the scratch run)")
    p.add_argument("--eval-interval", type=int, default=None, help="default steps/25")
    p.add_argument("--eval-iters", type=int, default=None,
                   help="train.eval_iters: global batches of held-out sequences per evaluation "
                        "(default 6 = 96 sequences; --quick 2)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--deepspeed-config", default="ds_configs/zero1_fp32.json")
    p.add_argument("--probe-steps", type=int, default=None,
                   help="steps per --nproc auto timing run (default 12, --quick 6)")
    p.add_argument("--reuse", action="store_true",
                   help="skip runs already complete in DIR with the identical config")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="only (re)analyse the runs already in DIR")
    a = p.parse_args(argv)
    q = a.quick
    a.steps = a.steps or (40 if q else 400)
    a.layers = a.layers or (6 if q else 12)
    a.hidden = a.hidden or (64 if q else 128)
    a.stages = [int(x) for x in (a.stages or ("1,2,3,6" if q else "1,3,6,12")).split(",")]
    a.stage_ends = [float(x) for x in a.stage_ends.split(",")]
    a.eval_interval = a.eval_interval or max(1, a.steps // (8 if q else 25))
    a.eval_iters = a.eval_iters or (2 if q else 6)
    a.probe_steps = a.probe_steps or (6 if q else 12)
    a.nproc = a.nproc or ("2" if q else "auto")
    if a.lr_sweep == "default":
        a.lr_sweep = "2e-3,4e-3" if q else "1e-3,2e-3,4e-3"
    a.sweep_lrs = [float(x) for x in a.lr_sweep.split(",")] if a.lr_sweep else []
    a.sweep_steps = a.sweep_steps or max(1, a.steps // 3)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in a.methods:
        if m not in METHODS:
            p.error(f"unknown method '{m}'; choose from {', '.join(METHODS)}")
    if "scratch" not in a.methods:
        a.methods.insert(0, "scratch")
    if a.stages[-1] != a.layers:
        p.error(f"--stages {a.stages} must end at --layers {a.layers}")
    if (a.data_prefix is None) != (a.tokenizer is None):
        p.error("give both --data-prefix and --tokenizer, or neither")
    return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[acceleration {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- data
def prepare_data(a) -> tuple[str, str, int]:
    """(prefix, tokenizer, vocab). Builds a small-vocabulary tokenizer and dataset once."""
    from apollo_ds.data import load_tokenizer
    if a.data_prefix:
        return a.data_prefix, a.tokenizer, load_tokenizer(a.tokenizer).vocab_size
    os.makedirs(a.cache_dir, exist_ok=True)
    tag = f"spm{a.vocab_size}"
    tok = os.path.join(a.cache_dir, f"{tag}.model")
    prefix = os.path.join(a.cache_dir, f"corpus_{tag}")
    if not os.path.isfile(tok):
        log(f"training a {a.vocab_size}-token SentencePiece model on {a.corpus_text}")
        subprocess.run([sys.executable, "data_prep/train_tokenizer.py", "--input",
                        a.corpus_text, "--vocab-size", str(a.vocab_size), "--model-prefix",
                        tok[:-len(".model")]], check=True)
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        log(f"tokenizing {a.corpus_text} -> {prefix}.bin/.idx")
        subprocess.run([sys.executable, "data_prep/preprocess_data.py", "--input",
                        a.corpus_text, "--tokenizer-model", tok, "--output-prefix", prefix,
                        "--append-eod", "--workers", str(min(2, os.cpu_count() or 1))],
                       check=True)
    return prefix, tok, load_tokenizer(tok).vocab_size


# ----------------------------------------------------------------------------- runs
def run_config(a, data, method: str, lr: float, steps: int, out_dir: str,
               eval_interval: int | None = None) -> dict:
    prefix, tok, vocab = data
    ap = dict(METHODS[method])
    if ap["enabled"]:
        ap["stages"] = list(a.stages)
        ap["stage_ends"] = list(a.stage_ends)
    return {
        "model": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads,
                  "seq_len": a.seq_len, "vocab_size": vocab},
        "apollo": ap,
        "parallel": {"tp": 1, "pp": 1},
        "data": {"prefix": prefix, "tokenizer": tok, "split": "98,2,0",
                 "cache_dir": os.path.join(a.cache_dir, "index_cache")},
        "train": {"steps": steps, "micro_batch": a.micro_batch,
                  "global_batch": a.global_batch, "lr": lr, "min_lr": lr * a.min_lr_ratio,
                  "warmup": a.warmup, "weight_decay": 0.01, "grad_clip": 1.0,
                  "optimizer": "adamw", "seed": a.seed, "out_dir": out_dir,
                  "save_interval": 0, "eval_interval": eval_interval or a.eval_interval,
                  "eval_iters": a.eval_iters, "log_interval": max(1, steps // 10),
                  "deepspeed_config": a.deepspeed_config},
    }


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    recs = {}
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in r and r.get("kind") != "eval":
                recs[r["step"]] = r
    out = [recs[s] for s in sorted(recs)]
    for r in out:
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise SystemExit(f"acceleration.py: {path} step {r.get('step')} lacks {missing}: "
                             f"the training loop no longer writes them")
    return out


def is_complete(run_dir: str, cfg: dict) -> bool:
    try:
        with open(os.path.join(run_dir, "bench_config.yaml")) as f:
            if yaml.safe_load(f) != cfg:
                return False
        recs = read_metrics(run_dir)
    except (OSError, SystemExit):
        return False
    return bool(recs) and recs[-1]["step"] == cfg["train"]["steps"] \
        and "eval_loss" in recs[-1]


def train(a, name: str, cfg: dict, nproc: int, reuse: bool | None = None) -> list[dict]:
    run_dir = cfg["train"]["out_dir"]
    reuse = a.reuse if reuse is None else reuse
    if reuse and is_complete(run_dir, cfg):
        log(f"{name}: reusing the complete run in {run_dir}")
        return read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)   # pretrain.py would resume from a checkpoint
    os.makedirs(run_dir)
    cfg_path = os.path.join(run_dir, "bench_config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "apollo_ds/pretrain.py", "--config", cfg_path]
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore")
    log(f"{name}: {' '.join(cmd)}  (OMP_NUM_THREADS={threads}, log {run_dir}/train.log)")
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            logf.write(line)
            if line.startswith(("step", "expanded", "done", "error")) and (
                    "eval" in line or not line.startswith("step")):
                print(f"  {name}: {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        with open(os.path.join(run_dir, "train.log")) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"acceleration.py: run {name} failed ({rc}); log tail:\n{tail}")
    recs = read_metrics(run_dir)
    log(f"{name}: done in {time.time() - t0:.0f} s (process), final eval loss "
        f"{recs[-1].get('eval_loss', float('nan')):.4f}")
    if not a.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return recs


def pick_nproc(a, data) -> tuple[int, dict]:
    if a.nproc != "auto":
        return int(a.nproc), {"chosen": int(a.nproc), "how": "given"}
    if (os.cpu_count() or 1) < 2:
        return 1, {"chosen": 1, "how": "one core"}
    times = {}
    # 2 first, then 1: the first launch also builds the index cache, a fixed cost not timed
    for n in (2, 1):
        cfg = run_config(a, data, "scratch", a.lr, a.probe_steps,
                         os.path.join(a.out, "probe", f"nproc{n}"), eval_interval=10**9)
        recs = train(a, f"probe nproc={n}", cfg, n, reuse=False)
        skip = min(2, len(recs) - 1)    # the first steps include lazy initialisation
        times[n] = statistics.median(r["step_time_s"] for r in recs[skip:])
    chosen = min(times, key=times.get)
    log("nproc probe: median full-depth step time " + ", ".join(
        f"{n} process(es) {t:.3f} s" for n, t in sorted(times.items())) + f" -> {chosen}")
    return chosen, {"chosen": chosen, "how": "probe", "median_step_s": times}


def expected_cost(a, method: str, vocab: int) -> float:
    """Expected FLOPs of a method's run as a fraction of scratch's (from the exact depth
    distributions), for the time estimate."""
    from apollo_ds import flops
    from apollo_ds.apollo import expected_depth
    from apollo_ds.config import ModelConfig
    ap = METHODS[method]
    per_layer = flops.layer_forward_flops_per_token(a.hidden, a.seq_len)
    head = 2 * a.hidden * flops.padded_vocab(vocab, ModelConfig().pad_vocab_to)
    if not ap["enabled"]:
        return 1.0
    bounds = [0.0] + list(a.stage_ends) + [1.0]
    cost = 0.0
    for n, lo, hi in zip(a.stages, bounds, bounds[1:]):
        d = expected_depth(ap["sampler"], a.layers, n)
        cost += (hi - lo) * (d * per_layer + head)
    return cost / (a.layers * per_layer + head)


def estimate(a, step_s: float, vocab: int, sweep: bool) -> str:
    eval_steps = a.eval_iters / 3          # eval_iters global batches, forward only
    full = a.steps * (1 + eval_steps / a.eval_interval)
    units = sum(expected_cost(a, m, vocab) for m in a.methods) * full
    launches = len(a.methods)
    if sweep:
        units += len(a.sweep_lrs) * a.sweep_steps * (1 + 4 * eval_steps / a.sweep_steps)
        launches += len(a.sweep_lrs)
    return (f"~{units * step_s / 60:.0f} min of training ({units:.0f} full-depth step "
            f"equivalents x {step_s:.2f} s) + ~{launches} x 30-60 s of process start-up")


# ----------------------------------------------------------------------------- analysis
def eval_points(recs: list[dict]) -> list[dict]:
    out, train_s = [], 0.0
    for r in recs:
        train_s += r.get("step_time_s", 0.0)
        if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]):
            out.append({"step": r["step"], "eval_loss": r["eval_loss"],
                        "flops": r["cum_flops"], "wall_s": r["wall_s"], "train_s": train_s})
    return out


def first_reach(points: list[dict], target: float) -> dict | None:
    """First evaluation at or below target; also FLOPs / seconds linearly interpolated
    between it and the evaluation before (loss assumed linear in between)."""
    for i, p in enumerate(points):
        if p["eval_loss"] <= target:
            res = {"step": p["step"], "flops": p["flops"], "wall_s": p["wall_s"],
                   "train_s": p["train_s"]}
            if i > 0:
                q = points[i - 1]
                f = (q["eval_loss"] - target) / (q["eval_loss"] - p["eval_loss"])
                for k in ("flops", "wall_s", "train_s"):
                    res[k + "_interp"] = q[k] + f * (p[k] - q[k])
            else:
                for k in ("flops", "wall_s", "train_s"):
                    res[k + "_interp"] = p[k]
            return res
    return None


def analyse(runs: dict[str, list[dict]]) -> dict:
    pts = {m: eval_points(r) for m, r in runs.items()}
    target = pts["scratch"][-1]["eval_loss"]
    ref = first_reach(pts["scratch"], target)
    ends = {m: runs[m][-1] for m in runs}
    out = {"target_eval_loss": target, "methods": {}}
    for m in runs:
        end = ends[m]
        train_s = sum(r.get("step_time_s", 0.0) for r in runs[m])
        res = {"final_eval_loss": pts[m][-1]["eval_loss"], "steps": end["step"],
               "total_flops": end["cum_flops"], "total_full_depth_flops":
               end["cum_full_depth_flops"], "total_wall_s": end["wall_s"],
               "total_train_s": train_s,
               "total_flops_ratio": end["cum_flops"] / ends["scratch"]["cum_flops"],
               "total_wall_ratio": end["wall_s"] / ends["scratch"]["wall_s"],
               "final_loss_gap": pts[m][-1]["eval_loss"] - target}
        hit = first_reach(pts[m], target)
        res["reached"] = hit is not None
        if hit:
            res["reach"] = hit
            for k in ("flops", "wall_s", "train_s"):
                for suf in ("", "_interp"):
                    ratio = hit[k + suf] / ref[k + suf]
                    res[f"{k}{suf}_ratio"] = ratio
                    res[f"{k}{suf}_saving"] = 1.0 - ratio
        out["methods"][m] = res
    return out


def print_summary(an: dict, lr: float, nproc: int) -> None:
    print()
    print(f"target: scratch's final eval loss {an['target_eval_loss']:.4f} (lr {lr:g}, "
          f"{nproc} process(es) per run)")
    hdr = (f"{'method':<13} {'final eval':>10} {'FLOPs to target':>16} {'saving':>7} "
           f"{'wall to target':>15} {'saving':>7} {'total FLOPs':>12} {'total wall':>11}")
    print(hdr)
    print("-" * len(hdr))
    for m, r in an["methods"].items():
        tf = f"{r['total_flops']:.3e}x{r['total_flops_ratio']:.2f}"
        tw = f"{r['total_wall_s']:.0f}s x{r['total_wall_ratio']:.2f}"
        if r["reached"]:
            h = r["reach"]
            fl = f"{h['flops_interp']:.3e}x{r['flops_interp_ratio']:.2f}"
            wl = f"{h['wall_s_interp']:.0f}s x{r['wall_s_interp_ratio']:.2f}"
            print(f"{m:<13} {r['final_eval_loss']:>10.4f} {fl:>16} "
                  f"{100 * r['flops_interp_saving']:>6.1f}% {wl:>15} "
                  f"{100 * r['wall_s_interp_saving']:>6.1f}% {tf:>12} {tw:>11}")
        else:
            print(f"{m:<13} {r['final_eval_loss']:>10.4f} {'not reached':>16} {'-':>7} "
                  f"{'not reached':>15} {'-':>7} {tf:>12} {tw:>11}  "
                  f"(+{r['final_loss_gap']:.4f} at end)")
    print("FLOPs / wall to target: interpolated between evaluations; xR = ratio to scratch; "
          "saving = 1 - ratio. Not reached: the ratios are at the method's end, with its gap.")


def plot(runs: dict[str, list[dict]], target: float, out: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (.venv/bin/pip install matplotlib): no PNGs")
        return []
    files = []
    for key, label, fname, scale in (("flops", "training FLOPs", "eval_loss_vs_flops.png", 1.0),
                                     ("wall_s", "wall time (s)", "eval_loss_vs_wall.png", 1.0)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m, recs in runs.items():
            pts = eval_points(recs)
            ax.plot([p[key] * scale for p in pts], [p["eval_loss"] for p in pts],
                    marker="o", markersize=3, label=m)
        ax.axhline(target, color="gray", linestyle="--", linewidth=1,
                   label=f"scratch final {target:.3f}")
        lo = min(p["eval_loss"] for r in runs.values() for p in eval_points(r))
        ax.set_ylim(lo - 0.05, target + 1.0)
        ax.set_xlabel(label)
        ax.set_ylabel("eval loss (full depth)")
        ax.set_title(f"eval loss vs {label}; dashed: scratch's final eval loss", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    os.chdir(REPO)
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()
    data = prepare_data(a)
    log(f"data {data[0]} tokenizer {data[1]} ({data[2]} tokens); model {a.layers} layers x "
        f"{a.hidden}, seq {a.seq_len}; {a.steps} steps of {a.global_batch} sequences")
    from apollo_ds import flops
    from apollo_ds.config import ModelConfig
    per_layer = flops.layer_forward_flops_per_token(a.hidden, a.seq_len)
    head = 2 * a.hidden * flops.padded_vocab(data[2], ModelConfig().pad_vocab_to)
    log(f"LM head share of full-depth FLOPs: {100 * head / (a.layers * per_layer + head):.1f}%"
        f"; at depth 1: {100 * head / (per_layer + head):.1f}%")

    runs_dir = os.path.join(a.out, "runs")
    meta_path = os.path.join(a.out, "acceleration.json")
    if a.report_only:
        with open(meta_path) as f:
            prev = json.load(f)
        lr, nproc, sweep, nproc_info = prev["lr"], prev["nproc"], prev.get("lr_sweep"), \
            prev.get("nproc_choice")
    else:
        nproc, nproc_info = pick_nproc(a, data)
        if "median_step_s" in nproc_info:
            log("estimated time still to go: " + estimate(
                a, nproc_info["median_step_s"][nproc], data[2], bool(a.sweep_lrs)))
        log("expected FLOPs of each method relative to scratch: " + ", ".join(
            f"{m} {expected_cost(a, m, data[2]):.3f}" for m in a.methods))
        lr, sweep = a.lr, None
        if a.sweep_lrs:
            sweep = {"steps": a.sweep_steps, "results": {}}
            for x in a.sweep_lrs:
                cfg = run_config(a, data, "scratch", x, a.sweep_steps,
                                 os.path.join(a.out, "sweep", f"lr{x:g}"),
                                 eval_interval=(a.eval_interval if a.sweep_steps == a.steps
                                                else max(1, a.sweep_steps // 4)))
                recs = train(a, f"sweep lr={x:g}", cfg, nproc)
                sweep["results"][f"{x:g}"] = recs[-1]["eval_loss"]
            lr = float(min(sweep["results"], key=sweep["results"].get))
            sweep["chosen"] = lr
            log("LR sweep (final eval loss after %d steps): %s -> lr %g" % (
                a.sweep_steps, ", ".join(f"{k}: {v:.4f}" for k, v in sweep["results"].items()),
                lr))
        for m in a.methods:
            cfg = run_config(a, data, m, lr, a.steps, os.path.join(runs_dir, m))
            if m == "scratch" and sweep and a.sweep_steps == a.steps:
                src = os.path.join(a.out, "sweep", f"lr{lr:g}")
                shutil.rmtree(cfg["train"]["out_dir"], ignore_errors=True)
                shutil.copytree(src, cfg["train"]["out_dir"])
                log(f"scratch: reusing the sweep run at lr {lr:g} ({src})")
                continue
            train(a, m, cfg, nproc)
    runs = {m: read_metrics(os.path.join(runs_dir, m)) for m in a.methods
            if os.path.isfile(os.path.join(runs_dir, m, "metrics.jsonl"))}
    if "scratch" not in runs:
        raise SystemExit(f"acceleration.py: no scratch run in {runs_dir}")
    an = analyse(runs)
    pngs = plot(runs, an["target_eval_loss"], a.out)
    result = {"lr": lr, "nproc": nproc, "nproc_choice": nproc_info, "lr_sweep": sweep,
              "quick": a.quick, "settings": {k: v for k, v in vars(a).items()},
              "data": {"prefix": data[0], "tokenizer": data[1], "vocab": data[2]},
              "elapsed_s": time.time() - t_start, **an, "plots": pngs,
              "curves": {m: eval_points(r) for m, r in runs.items()}}
    with open(meta_path, "w") as f:
        json.dump(result, f, indent=1)
    print_summary(an, lr, nproc)
    log(f"wrote {meta_path}" + (" and " + ", ".join(pngs) if pngs else "") +
        f" ({time.time() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
