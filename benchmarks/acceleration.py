#!/usr/bin/env python3
"""Does growth reach the from-scratch loss with fewer FLOPs? An ablation that can tell methods apart.

    .venv/bin/python benchmarks/acceleration.py --methods scratch,grow6_12_const \
        --seeds 1234,7,99 [--compare steps,flops] [--lr-sweep 5e-4,1e-3,2e-3] [--nproc 1]

Every run is a real ``python -m torch.distributed.run --nproc_per_node N apollo_ds/pretrain.py
--config <generated yaml>`` subprocess, one after another, on the same data, model, batch and
steps. Methods are named sets of config overrides (benchmarks/acceleration_methods.py;
``--list-methods``), or defined on the command line with ``--define 'NAME: apollo.stages=[4,12]
apollo.stage_ends=[0.3] train.beta2=0.999'``. Each method is compared with the scratch run of
its schedule family (scratch: cosine, scratch_wsd: warmup-stable-decay) at the same LR and seed:
  --compare steps  at scratch's steps: final eval loss, and FLOPs to reach scratch's final
                   eval loss over scratch's FLOPs to get there;
  --compare flops  the method lengthened until it spends scratch's FLOPs (steps / expected
                   FLOPs fraction from the exact depth distributions, apollo_ds.flops
                   convention; the same stage fractions): final eval loss against scratch's.
Seeds: --seeds; per method the mean and min..max over seeds, and "no difference" where the
mean difference is within the seed spread (benchmarks/acceleration_report.py).

--lr-sweep LRS trains scratch (each schedule family the methods need) at those LRs on the
first seed at full length, and extends the list by factors of 2 while the best is at an edge
(--sweep-extend times), so the optimum is bracketed; methods then use the family's best LR
unless --lr is given.

Results accumulate in one JSON store (--results, default benchmarks/results/acceleration.json):
every finished run (definition, config, eval curve, FLOPs, wall time) and every invocation's
exact command line, so several invocations (the ablation in pieces) merge, and a run already
in the store with the identical config is not repeated (--fresh repeats it). After the runs
the report is printed, and written as a markdown table and loss-vs-FLOPs PNG next to the
store. --report-only just re-reports; --dry-run lists the runs and their expected cost.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(REPO, "benchmarks")
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)
import acceleration_methods as am  # noqa: E402
import acceleration_report as ar   # noqa: E402

CORPUS_TXT = ".cache/apollo_ds/data/corpus.txt"
CACHE = ".cache/apollo_ds/bench"
RESULTS = os.path.join("benchmarks", "results", "acceleration.json")
REQUIRED = ("step", "loss", "cum_flops", "cum_full_depth_flops", "wall_s")
FALLBACK_LR = 1e-3


# ----------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 6 layers x 64, 40 steps, stages scaled to 6 layers, "
                        "store in --out (a few minutes per method)")
    p.add_argument("--long", action="store_true",
                   help="the longer horizon: 8 layers x 96, 3200 steps (8x today's), stages "
                        "scaled to 8 layers, store benchmarks/results/acceleration_long.json "
                        "(FLOPs per step ~0.4x today's; a scratch run took 22 min at --threads 1, "
                        "two side by side on 2 cores)")
    p.add_argument("--out", default="runs/acceleration", help="work directory of the runs")
    p.add_argument("--results", default=None,
                   help=f"JSON results store (default {RESULTS}; --quick: OUT/acceleration.json)")
    p.add_argument("--data-prefix", default=None,
                   help="indexed dataset prefix; default: the demo corpus re-tokenized with a "
                        "--vocab-size SentencePiece model (built once into --cache-dir)")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model of --data-prefix")
    p.add_argument("--corpus-text", default=CORPUS_TXT)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--cache-dir", default=CACHE, help="tokenizer, dataset and index cache")
    p.add_argument("--methods", default="scratch,apollo_copy,apollo_reset,stack",
                   help="comma list of method names (--list-methods); the scratch baseline "
                        "of each method's schedule family is added")
    p.add_argument("--define", action="append", default=[], metavar="'NAME: sec.key=val ...'",
                   help="define a method (repeatable); then name it in --methods")
    p.add_argument("--list-methods", action="store_true")
    p.add_argument("--seeds", default=None, help="comma list (default 1234)")
    p.add_argument("--compare", default="steps", help="steps, flops, or steps,flops")
    p.add_argument("--nproc", default="1", choices=("auto", "1", "2"),
                   help="processes per run (auto: time both at full depth, use the faster)")
    p.add_argument("--steps", type=int, default=None, help="default 400; --quick 40")
    p.add_argument("--layers", type=int, default=None, help="full depth L (default 12)")
    p.add_argument("--hidden", type=int, default=None, help="default 128")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=None,
                   help=f"LR of every run (default: the family's swept best in the store, "
                        f"else {FALLBACK_LR:g})")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="min_lr = ratio * lr")
    p.add_argument("--warmup", type=float, default=0.025, help="warm-up fraction")
    p.add_argument("--lr-sweep", default=None, metavar="LRS",
                   help="comma list of scratch LRs to sweep first (first seed, full length)")
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="extra LRs (x2 or /2) tried while the best is at an edge")
    p.add_argument("--eval-interval", type=int, default=None, help="default steps/25")
    p.add_argument("--eval-iters", type=int, default=None, help="default 6; --quick 2")
    p.add_argument("--deepspeed-config", default="ds_configs/zero1_fp32.json")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP threads per process (default cores / nproc); 1 to run two "
                        "invocations side by side on 2 cores (they share the store safely)")
    p.add_argument("--fresh", action="store_true",
                   help="rerun runs the store already holds with the identical config")
    p.add_argument("--no-baseline", action="store_true", help="do not add each method's "
                   "same-LR scratch run (compare with the tuned scratch: the report's 2nd table)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs only")
    a = p.parse_args(argv)
    q = a.quick
    if q and a.long:
        p.error("--quick and --long exclude each other")
    a.steps = a.steps or (40 if q else 3200 if a.long else 400)
    a.layers = a.layers or (6 if q else 8 if a.long else 12)
    a.hidden = a.hidden or (64 if q else 96 if a.long else 128)
    a.eval_interval = a.eval_interval or max(1, a.steps // (8 if q else 25))
    a.eval_iters = a.eval_iters or (2 if q else 6)
    a.results = a.results or (os.path.join(a.out, "acceleration.json") if q else
                              RESULTS.replace(".json", "_long.json") if a.long else RESULTS)
    a.seed_list = [int(s) for s in (a.seeds or "1234").split(",")]
    a.modes = [m.strip() for m in a.compare.split(",") if m.strip()]
    for m in a.modes:
        if m not in ("steps", "flops"):
            p.error(f"--compare {a.compare}: '{m}' is not steps or flops")
    try:
        # run in the order given (the likeliest optimum first), judged sorted
        a.sweep_lrs = [float(x) for x in a.lr_sweep.split(",")] if a.lr_sweep else []
    except ValueError:
        p.error(f"--lr-sweep {a.lr_sweep}: expected a comma list of numbers")
    a.extra = {}
    for text in a.define:
        try:
            name, m = am.parse_define(text)
        except ValueError as e:
            p.error(str(e))
        a.extra[name] = m
    a.method_list = []
    for name in (x.strip() for x in a.methods.split(",") if x.strip()):
        try:
            m = am.get(name, a.extra)
        except KeyError:
            p.error(f"--methods: unknown method '{name}'; choose from "
                    f"{', '.join({**am.METHODS, **a.extra})} or --define it")
        for b in ((name,) if a.no_baseline else (am.baseline_for(m), name)):
            if b not in a.method_list:
                a.method_list.append(b)
    if (a.data_prefix is None) != (a.tokenizer is None):
        p.error("give both --data-prefix and --tokenizer, or neither")
    return a


def log(msg: str) -> None:
    print(f"[acceleration {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ----------------------------------------------------------------------------- configs
def scaled_apollo(a, ap: dict, name: str) -> dict:
    """Methods are written for 12 layers; at another --layers scale the stage counts."""
    ap = copy.deepcopy(ap)
    if ap.get("enabled") and ap["stages"][-1] != a.layers:
        st = [max(1, int(s * a.layers / ap["stages"][-1] + 0.5)) for s in ap["stages"]]
        if any(x >= y for x, y in zip(st, st[1:])):
            raise SystemExit(f"acceleration.py: method {name}: stages {ap['stages']} do not "
                             f"scale to --layers {a.layers} ({st}); --define one for it")
        ap["stages"] = st
    return ap


def run_config(a, data, name: str, method: dict, lr: float, seed: int, steps: int,
               out_dir: str) -> dict:
    prefix, tok, vocab = data
    train = {"steps": steps, "micro_batch": a.micro_batch, "global_batch": a.global_batch,
             "lr": lr, "min_lr": lr * a.min_lr_ratio, "warmup": a.warmup,
             "weight_decay": 0.01, "grad_clip": 1.0, "optimizer": "adamw", "seed": seed,
             "out_dir": out_dir, "save_interval": 0,
             "eval_interval": max(1, round(a.eval_interval * steps / a.steps)),
             "eval_iters": a.eval_iters, "log_interval": max(1, steps // 10),
             # a day: the watchdog counts a pause (SIGSTOP on a shared machine) as a hang
             "deepspeed_config": a.deepspeed_config, "dist_timeout_minutes": 1440}
    train.update(method.get("train", {}))
    model = {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "seq_len": a.seq_len,
             "vocab_size": vocab, **method.get("model", {})}
    return {"model": model, "apollo": scaled_apollo(a, method["apollo"], name),
            "parallel": {"tp": 1, "pp": 1},
            "data": {"prefix": prefix, "tokenizer": tok, "split": "98,2,0",
                     "cache_dir": os.path.join(a.cache_dir, "index_cache")},
            "train": train}


def comparable(cfg: dict) -> dict:
    """A run's config without where it and its data live (identity for reuse; the data's
    content is the store's benchmark.data fingerprint)."""
    c = copy.deepcopy(cfg)
    for k in ("out_dir", "dist_timeout_minutes"):   # neither changes what is trained
        c["train"].pop(k, None)
    for k in ("prefix", "tokenizer", "cache_dir"):
        c["data"].pop(k, None)
    return c


def data_fingerprint(prefix: str) -> dict:
    """Name, sizes and the .idx's sha256 (document boundaries and token counts) of a dataset."""
    with open(prefix + ".idx", "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"name": os.path.basename(prefix), "idx_sha256": digest,
            "bin_bytes": os.path.getsize(prefix + ".bin")}


def check_config(cfg: dict, nproc: int, name: str) -> None:
    """Refuse a bad method before any run starts, with the config loader's own message."""
    from apollo_ds.config import ConfigError, load_config, validate
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    try:
        validate(load_config(f.name), world_size=nproc, check_files=False)
    except ConfigError as e:
        print(f"acceleration.py: method {name}: {e}", file=sys.stderr)
        raise SystemExit(2)
    finally:
        os.unlink(f.name)


# ----------------------------------------------------------------------------- runs
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


def dir_complete(run_dir: str, cfg: dict) -> bool:
    try:
        with open(os.path.join(run_dir, "bench_config.yaml")) as f:
            if comparable(yaml.safe_load(f)) != comparable(cfg):
                return False
        recs = read_metrics(run_dir)
    except (OSError, SystemExit):
        return False
    return bool(recs) and recs[-1]["step"] == cfg["train"]["steps"] and "eval_loss" in recs[-1]


def train(a, label: str, cfg: dict, nproc: int) -> list[dict]:
    """Train one run, holding RUN_DIR.lock: a second invocation that plans the same run (two
    streams both add a method's scratch baseline) waits and then adopts it; without the lock
    it deleted the live run directory and the curve was lost."""
    run_dir = cfg["train"]["out_dir"]
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
    with open(run_dir.rstrip("/") + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{label}: another invocation is training this run; waiting to adopt it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _train_locked(a, label, cfg, nproc, run_dir)


def _train_locked(a, label: str, cfg: dict, nproc: int, run_dir: str) -> list[dict]:
    if not a.fresh and dir_complete(run_dir, cfg):
        log(f"{label}: adopting the complete run in {run_dir}")
        return read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)   # pretrain.py would resume from a checkpoint
    os.makedirs(run_dir)
    cfg_path = os.path.join(run_dir, "bench_config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), "apollo_ds/pretrain.py", "--config", cfg_path]
    threads = a.threads or max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore")
    log(f"{label}: {' '.join(cmd)}  (OMP_NUM_THREADS={threads}, log {run_dir}/train.log)")
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            logf.write(line)
            if line.startswith(("expanded", "done", "error")) or (
                    line.startswith("step") and "eval" in line):
                print(f"  {label}: {line.rstrip()}", flush=True)
        rc = proc.wait()
    if rc != 0:
        with open(os.path.join(run_dir, "train.log")) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"acceleration.py: run {label} failed ({rc}); log tail:\n{tail}")
    recs = read_metrics(run_dir)
    log(f"{label}: done in {time.time() - t0:.0f} s, final eval loss "
        f"{recs[-1].get('eval_loss', float('nan')):.4f}")
    if not a.keep_checkpoints:
        shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return recs


def pick_nproc(a, data) -> int:
    if a.nproc != "auto":
        return int(a.nproc)
    if (os.cpu_count() or 1) < 2:
        return 1
    times = {}
    for n in (2, 1):   # 2 first: the first launch also builds the index cache (untimed)
        cfg = run_config(a, data, "scratch", am.get("scratch"), FALLBACK_LR, a.seed_list[0],
                         12, os.path.join(a.out, "probe", f"nproc{n}"))
        cfg["train"]["eval_interval"] = 10**9
        recs = train(argparse.Namespace(**{**vars(a), "fresh": True}), f"probe nproc={n}",
                     cfg, n)
        times[n] = statistics.median(r["step_time_s"] for r in recs[2:])
    chosen = min(times, key=times.get)
    log(f"nproc probe: median step {times} -> {chosen}")
    return chosen


# ----------------------------------------------------------------------------- store
def bench_settings(a, data) -> dict:
    return {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "seq_len": a.seq_len,
            "vocab": data[2], "data": data_fingerprint(data[0]), "steps": a.steps,
            "micro_batch": a.micro_batch, "global_batch": a.global_batch, "warmup": a.warmup,
            "min_lr_ratio": a.min_lr_ratio, "eval_interval": a.eval_interval,
            "eval_iters": a.eval_iters, "deepspeed_config": a.deepspeed_config}


def load_store(a, data) -> dict:
    bench = bench_settings(a, data)
    if os.path.isfile(a.results):
        with open(a.results) as f:
            store = json.load(f)
        if store["benchmark"] != bench:
            diff = {k: (store["benchmark"].get(k), v) for k, v in bench.items()
                    if store["benchmark"].get(k) != v}
            print(f"acceleration.py: {a.results} holds another benchmark setting (stored, "
                  f"now): {diff}; use --results NEW.json for it", file=sys.stderr)
            raise SystemExit(2)
        return store
    return {"benchmark": bench, "commands": [], "sweeps": {}, "runs": {}}


def merge_store(store: dict, disk: dict) -> None:
    """Fold into ``store`` (this invocation's view) what other invocations saved meanwhile,
    so several invocations may share one store (two 1-thread streams on 2 cores)."""
    for k, v in disk["runs"].items():
        store["runs"].setdefault(k, v)
    for fam, sw in disk["sweeps"].items():
        mine = store["sweeps"].get(fam)
        if mine is None or (mine["seed"], mine["steps"]) != (sw["seed"], sw["steps"]):
            store["sweeps"].setdefault(fam, sw)
            continue
        res = {**sw["results"], **mine["results"]}
        lrs = sorted(float(x) for x in res)
        best = min(lrs, key=lambda x: res[f"{x:g}"])
        mine.update(results=res, best=best, bracketed=best not in (lrs[0], lrs[-1]))
    ident = lambda c: (tuple(c["argv"]), c["utc"])   # noqa: E731
    ours = {ident(c): c for c in store["commands"]}
    # a command's run list only grows: the longer copy is the newer one (ours stays ours)
    merged = [max((ours.pop(ident(c), c), c), key=lambda x: len(x["runs"]))
              for c in disk["commands"]] + list(ours.values())
    store["commands"][:] = merged
    for i, c in enumerate(merged):
        for k in c["runs"]:
            if k in store["runs"]:
                store["runs"][k]["command"] = i


def save_store(a, store: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(a.results)), exist_ok=True)
    with open(a.results + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # read-merge-write: concurrent invocations
        if os.path.isfile(a.results):
            with open(a.results) as f:
                merge_store(store, json.load(f))
        store["analysis"] = ar.analyse_store(store)
        tmp = a.results + ".tmp"
        with open(tmp, "w") as f:
            json.dump(store, f, indent=1)
        os.replace(tmp, a.results)


def record(store: dict, key: str, name: str, method: dict, cfg: dict, mode: str,
           recs: list[dict], cmd_index: int) -> dict:
    pts = ar.eval_points(recs)
    entry = {"method": name, "definition": method, "lr": cfg["train"]["lr"],
             "seed": cfg["train"]["seed"], "steps": cfg["train"]["steps"], "mode": mode,
             "family": am.family(method), "config": comparable(cfg),
             "final_eval_loss": pts[-1]["eval_loss"], "total_flops": recs[-1]["cum_flops"],
             "total_wall_s": recs[-1]["wall_s"],
             "total_train_s": sum(r.get("step_time_s", 0.0) for r in recs),
             "command": cmd_index,
             "curve": [{k: (round(v, 5) if k == "eval_loss" else v) for k, v in p.items()}
                       for p in pts]}
    store["runs"][key] = entry
    return entry


# ----------------------------------------------------------------------------- plan
class Bench:
    def __init__(self, a, data, store, nproc, cmd_index):
        self.a, self.data, self.store, self.nproc = a, data, store, nproc
        self.command = store["commands"][cmd_index]   # its index moves when stores merge
        self.planned: dict[str, float] = {}     # --dry-run: run key -> expected cost

    def steps_for(self, method: dict, mode: str) -> int:
        if mode == "steps" or not method["apollo"].get("enabled"):
            return self.a.steps
        ap = scaled_apollo(self.a, method["apollo"], "?")
        cost = am.expected_cost({"apollo": ap}, self.a.layers, self.a.hidden, self.a.seq_len,
                                self.data[2])
        return int(round(self.a.steps / cost))

    def lr_for(self, method: dict) -> float:
        if self.a.lr is not None:
            return self.a.lr
        sw = self.store["sweeps"].get(am.family(method))
        return sw["best"] if sw else FALLBACK_LR

    def run(self, name: str, lr: float, seed: int, mode: str, dry: bool = False) -> dict | None:
        method = am.get(name, self.a.extra)
        steps = self.steps_for(method, mode)
        key = ar.run_key(name, lr, seed, steps)
        cfg = run_config(self.a, self.data, name, method, lr, seed, steps,
                         os.path.join(self.a.out, "runs", key))
        check_config(cfg, self.nproc, name)
        have = self.store["runs"].get(key)
        if have and have["config"] == comparable(cfg) and not self.a.fresh:
            if not dry:
                log(f"{key}: in the store (final eval loss {have['final_eval_loss']:.4f})")
            return have
        if dry:
            cost = am.expected_cost({"apollo": cfg["apollo"]}, self.a.layers, self.a.hidden,
                                    self.a.seq_len, self.data[2]) * steps / self.a.steps
            if key not in self.planned:
                log(f"would run {key} ({mode}; ~{cost:.2f} scratch-run equivalents)")
            self.planned[key] = cost
            return {"final_eval_loss": float("nan")}
        recs = train(self.a, key, cfg, self.nproc)
        entry = record(self.store, key, name, method, cfg, mode, recs,
                       self.store["commands"].index(self.command))
        self.command["runs"].append(key)
        save_store(self.a, self.store)
        return entry

    def sweep(self, fam_method: str, dry: bool) -> None:
        a, seed = self.a, self.a.seed_list[0]
        fam = am.family(am.get(fam_method, a.extra))
        prev = self.store["sweeps"].get(fam)
        # an earlier invocation's sweep (same seed and length) counts: sweeps merge
        results = dict(prev["results"]) if prev and (prev["seed"], prev["steps"]) == (
            seed, a.steps) else {}
        order = list(a.sweep_lrs) + [float(k) for k in results
                                     if float(k) not in a.sweep_lrs]
        extended = 0
        while True:
            for lr in order:
                if f"{lr:g}" not in results:
                    e = self.run(fam_method, lr, seed, "steps", dry)
                    results[f"{lr:g}"] = e.get("final_eval_loss", float("nan"))
            if dry:
                return
            lrs = sorted(order)
            best = min(lrs, key=lambda x: results[f"{x:g}"])
            edge = best in (lrs[0], lrs[-1]) and len(lrs) > 1
            if not edge or extended >= a.sweep_extend:
                break
            new = best / 2 if best == lrs[0] else best * 2
            order, extended = order + [new], extended + 1
            log(f"sweep {fam}: best lr {best:g} is at an edge; adding {new:g}")
        merged = results
        all_lrs = sorted(float(k) for k in merged)
        best = min(all_lrs, key=lambda x: merged[f"{x:g}"])
        self.store["sweeps"][fam] = {"seed": seed, "steps": a.steps, "method": fam_method,
                                     "results": merged, "best": best,
                                     "bracketed": best not in (all_lrs[0], all_lrs[-1])}
        save_store(a, self.store)
        log(f"sweep {fam}: " + ", ".join(f"{x:g}: {merged[f'{x:g}']:.4f}" for x in all_lrs)
            + f" -> {best:g}" + ("" if best not in (all_lrs[0], all_lrs[-1])
                                 else " (NOT bracketed)"))


# ----------------------------------------------------------------------------- main
def report(a, store: dict) -> None:
    an = ar.analyse_store(store)
    ar.print_report(store, an["rows"], an["sampler_contrasts"], an["tuned_rows"])
    base = os.path.splitext(a.results)[0]
    with open(base + "_table.md", "w") as f:
        f.write(ar.full_markdown(store, an))
    png = ar.plot(store, [r for r in an["rows"] if r["mode"] == "steps"],
                  base + "_loss_vs_flops.png")
    log(f"store {a.results}; wrote {base}_table.md" + (f", {png}" if png else ""))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    if a.list_methods:
        for name in {**am.METHODS, **a.extra}:
            m = am.get(name, a.extra)
            print(f"{name:<24} {json.dumps({k: v for k, v in m.items() if v})}")
        return 0
    os.chdir(REPO)
    if a.report_only:     # needs only the store, not the data
        if not os.path.isfile(a.results):
            print(f"acceleration.py: --report-only: {a.results} does not exist", file=sys.stderr)
            return 2
        with open(a.results) as f:
            report(a, json.load(f))
        return 0
    os.makedirs(a.out, exist_ok=True)
    data = prepare_data(a)
    store = load_store(a, data)
    nproc = 1 if a.dry_run else pick_nproc(a, data)
    store["commands"].append({
        "argv": "benchmarks/acceleration.py " + " ".join(shlex.quote(x) for x in argv),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": nproc, "runs": []})
    bench = Bench(a, data, store, nproc, len(store["commands"]) - 1)
    log(f"model {a.layers} x {a.hidden}, {a.steps} steps x {a.global_batch} sequences; "
        f"methods {a.method_list}; seeds {a.seed_list}; compare {a.modes}; {nproc} process(es)")
    if a.sweep_lrs:
        for fam_method in dict.fromkeys(am.baseline_for(am.get(m, a.extra))
                                        for m in a.method_list):
            bench.sweep(fam_method, a.dry_run)
    for seed in a.seed_list:
        for name in a.method_list:
            method = am.get(name, a.extra)
            lr = bench.lr_for(method)
            for mode in a.modes:
                if mode == "flops" and not method["apollo"].get("enabled"):
                    continue
                bench.run(name, lr, seed, mode, a.dry_run)
    if a.dry_run:
        log(f"planned: {len(bench.planned)} runs, ~{sum(bench.planned.values()):.2f} "
            f"scratch-run equivalents")
        return 0
    save_store(a, store)
    report(a, store)
    return 0


if __name__ == "__main__":
    sys.exit(main())
