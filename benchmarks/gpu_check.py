#!/usr/bin/env python3
"""One prepared check of apollo_ds on one CUDA GPU: throughput, memory, pool overhead, Apollo
expansion cost and exact resume, in a single process, in well under 8 minutes on an H100/H200.

    .venv/bin/python benchmarks/gpu_check.py [--out runs/gpu_check.json] [--peak-tflops X]
        [--phases tput,pool,apollo,resume] [--work-dir DIR] [--keep-work]
    .venv/bin/python benchmarks/gpu_check.py --smoke      # same code path, CPU, tiny shapes

Why one script: a GPU machine is lent for minutes at a time, so every GPU-only question is
answered by one bounded run that prints one table and writes one JSON file.

Phases (every one bounded by a step count, each prints its progress):
  tput    GPT-2 124M shape (12 x 768, 12 heads, seq 1024, vocab 50304), bf16 ZeRO-1
          (ds_configs/zero1_bf16.json), full depth, via Trainer.train_step: tokens/s, model
          TFLOP/s (apollo_ds.flops: matmuls only, recompute not counted), MFU against the card's
          dense bf16 peak, peak memory (torch.cuda.max_memory_allocated); one row per
          variant of TPUT: recompute none/selective/full, train.compile on (with and without
          full recompute), ZeRO 2 and 3 (bf16), and the Llama shape of the same size compiled.
  pool    PoolGPT (layer map [0..L-1]) against the plain sequential GPT of benchmarks/
          plain_gpt.py, same weights, batches and engine config, ABBA-interleaved
          (throughput.run_pool_plain, imported): the pool/plain tokens/s ratio.
  apollo  Apollo with two expansions (stages [3,6,12]): each expansion's wall time in units
          of the run's median step time.
  resume  N steps straight vs k steps + stop (train.stop_after) + resume to N (Apollo on,
          one expansion on each side of the stop), under torch.use_deterministic_algorithms
          and CUBLAS_WORKSPACE_CONFIG, SDPA restricted to its math kernel (deterministic on
          every torch version); the maximum absolute per-step loss difference must be 0.0.

Data is made offline (the GPU machine has no network and no corpus): docstrings of the Python
standard library -> a SentencePiece model (data_prep/train_tokenizer.py) -> an indexed dataset
(data_prep/preprocess_data.py). The 50304-entry model vocabulary is larger than that tokenizer;
apollo_ds only refuses the opposite (a tokenizer larger than model.vocab_size), so the unused
rows are ordinary, never-seen embedding rows, as in GPT-2's padded 50257 -> 50304.

The run is one process: a 1-rank group (RANK=0, WORLD_SIZE=1, a free MASTER_PORT) made by
apollo_ds.distributed.init at tp=pp=1, shared by all phases; each phase builds and destroys its
own engines. The peak table is keyed by torch.cuda.get_device_name() substrings; an unknown
card reports MFU n/a unless --peak-tflops is given. --smoke runs everything on the CPU with a
4-layer x 64 model in fp32 (bf16 matmuls are slow on CPUs without bf16 units); MFU and memory
are n/a there.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO):
    if p not in sys.path:
        sys.path.insert(0, p)
from throughput import free_port, run_pool_plain  # noqa: E402
from throughput_report import paired_ratio, summarise  # noqa: E402
from gpu_check_report import fmt, peak_for, print_table  # noqa: E402
from offline_data import make_data  # noqa: E402

PHASES = ("tput", "pool", "apollo", "resume")

# The tput variants, each at full depth through Trainer.train_step: (phase key, what differs
# from the base row: train.recompute none, compile off, the mode's ZeRO-1 config, GPT-2).
# "zero": the mode's config of that stage (bf16 on the GPU, fp32 in --smoke); "llama": the
# Llama shape of the same size (RMSNorm, SwiGLU, rotary, GQA with heads/3 K/V heads).
TPUT = [
    ("tput_recompute_none", {}),
    ("tput_recompute_selective", {"recompute": "selective"}),
    ("tput_recompute_full", {"recompute": "full"}),
    ("tput_compile", {"compile": True}),
    ("tput_compile_recompute_full", {"compile": True, "recompute": "full"}),
    ("tput_zero2", {"zero": 2}),
    ("tput_zero3", {"zero": 3}),
    ("tput_llama_compile", {"llama": True, "compile": True}),
]

# Step counts and shapes per mode; sized so the GPU run stays far below 8 minutes on an
# H100/H200 (the 124M model steps in ~0.1-0.2 s at 32 x 1024 tokens; engine builds, expansions
# and checkpoints dominate) and the smoke run below 2 minutes on 2 CPU cores.
MODES = {
    "gpu": dict(
        model=dict(layers=12, hidden=768, heads=12, seq_len=1024, vocab_size=50304),
        text_lines=8000, tokenizer_vocab=4096, ds_config="ds_configs/zero1_bf16.json",
        zero_config="ds_configs/zero{}_bf16.json",
        micro=8, global_batch=32, lr=3e-4,
        tput=dict(warmup=3, steps=8),
        pool=dict(warmup=2, steps=8, per_turn=2),
        apollo=dict(stages=[3, 6, 12], steps=24, ends=[8, 16]),
        # smaller batch: the math SDPA kernel keeps the whole s x s attention matrices
        resume=dict(stages=[3, 6, 12], steps=12, ends=[4, 8], stop=6, micro=4,
                    global_batch=8)),
    "smoke": dict(
        model=dict(layers=4, hidden=64, heads=4, seq_len=32, vocab_size=1024),
        text_lines=2000, tokenizer_vocab=512, ds_config="ds_configs/zero1_fp32.json",
        zero_config="ds_configs/zero{}_fp32.json",
        micro=2, global_batch=4, lr=3e-3,
        tput=dict(warmup=2, steps=8),
        pool=dict(warmup=2, steps=8, per_turn=2),
        apollo=dict(stages=[1, 2, 4], steps=9, ends=[3, 6]),
        resume=dict(stages=[1, 2, 4], steps=8, ends=[3, 5], stop=4, micro=2,
                    global_batch=4)),
}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_check.json", help="JSON results file")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, tiny shapes, fp32: the same code path in about a minute")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the card for MFU (default: from the table)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma list of {','.join(PHASES)}")
    p.add_argument("--work-dir", default="runs/gpu_check_work",
                   help="data, index cache and run directories")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the phases' checkpoints (deleted by default: ~1.7 GB each)")
    a = p.parse_args(argv)
    a.phase_list = [x.strip() for x in a.phases.split(",") if x.strip()]
    bad = [x for x in a.phase_list if x not in PHASES]
    if bad or not a.phase_list:
        p.error(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    return a


# ----------------------------------------------------------------------------- helpers
class Ctx(SimpleNamespace):
    """What every phase needs: mode settings S, data, the Dist, the peak, the work dir."""


def make_cfg(c: Ctx, name: str, steps: int, *, micro=None, global_batch=None, recompute="none",
             apollo=None, stop_after=0, extra=()):
    from apollo_ds.config import load_config, validate
    S, m = c.S, c.S["model"]
    over = [f"model.{k}={v}" for k, v in m.items()]
    over += [f"data.prefix={c.data['prefix']}", f"data.tokenizer={c.data['tokenizer']}",
             f"data.cache_dir={c.data['cache_dir']}", "data.split=98,2,0",
             f"train.micro_batch={micro or S['micro']}",
             f"train.global_batch={global_batch or S['global_batch']}",
             f"train.steps={steps}", f"train.lr={S['lr']}", "train.warmup=2",
             "train.seed=1234", f"train.deepspeed_config={S['ds_config']}",
             "train.optimizer=adamw", f"train.recompute={recompute}",
             f"train.out_dir={os.path.join(c.work, 'runs', name)}", "train.save_interval=0",
             "train.eval_interval=0", "train.eval_iters=1", "train.log_interval=4",
             f"train.stop_after={stop_after}"]
    over += list(extra)     # later overrides win
    if apollo:
        over += ["apollo.enabled=true", f"apollo.stages={apollo['stages']}",
                 f"apollo.stage_ends={apollo['ends']}"]
    else:
        over += ["apollo.enabled=false"]
    return validate(load_config(None, over), world_size=1)


def fresh(cfg) -> None:
    """A phase starts from nothing: a checkpoint left by an earlier run would be resumed."""
    shutil.rmtree(cfg.train.out_dir, ignore_errors=True)


def sync(c: Ctx) -> None:
    if c.cuda:
        import torch
        torch.cuda.synchronize()


def mem_start(c: Ctx) -> float | None:
    if not c.cuda:
        return None
    import torch
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def mem_peak(c: Ctx) -> float | None:
    if not c.cuda:
        return None
    import torch
    return torch.cuda.max_memory_allocated() / 2**30


def close(tr) -> None:
    tr.metrics.close()
    tr.runtime.destroy()


def rates(c: Ctx, tokens: float, flops: float, step_s: float) -> dict:
    tflops = flops / step_s / 1e12
    return {"tokens_per_s": tokens / step_s, "model_tflops": tflops,
            "mfu": tflops / c.peak if c.peak else None}


def read_losses(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    return {r["step"]: r for r in recs if "loss" in r}


# ----------------------------------------------------------------------------- phases
def variant_overrides(c: Ctx, opts: dict) -> list[str]:
    over = [f"train.compile={str(bool(opts.get('compile'))).lower()}"]
    if opts.get("zero"):
        over.append(f"train.deepspeed_config={c.S['zero_config'].format(opts['zero'])}")
    if opts.get("llama"):
        heads = c.S["model"]["heads"]
        over += ["model.arch=llama", f"model.kv_heads={max(1, heads // 3)}"]
    return over


def phase_tput(c: Ctx, key: str, opts: dict) -> dict:
    from apollo_ds.training.loop import Trainer
    P, L = c.S["tput"], c.S["model"]["layers"]
    total = P["warmup"] + P["steps"]
    recompute = opts.get("recompute", "none")
    cfg = make_cfg(c, key, total, recompute=recompute, extra=variant_overrides(c, opts))
    fresh(cfg)
    base = mem_start(c)
    t0 = time.perf_counter()
    tr = Trainer(cfg, c.dist)
    build_s = time.perf_counter() - t0
    recs = []
    try:     # engines freed even on failure: the later phases still need the memory
        for s in range(1, total + 1):
            recs.append(tr.train_step(s))
            if s == total or s % max(1, total // 4) == 0:
                log(f"{key}: step {s}/{total} loss {recs[-1]['loss']:.4f}"
                    f" {recs[-1]['tokens_per_s']:,.0f} tok/s")
    finally:
        close(tr)
    timed = recs[P["warmup"]:]
    assert all(dd == L for r in recs for dd in r["depths"]), "Apollo off must run depth L"
    med = statistics.median(r["step_time_s"] for r in timed)
    out = {"recompute": recompute, "compile": cfg.train.compile, "arch": cfg.model.arch,
           "ds_config": cfg.train.deepspeed_config,
           "steps_timed": len(timed), "warmup_steps": P["warmup"],
           "median_step_s": med, "min_step_s": min(r["step_time_s"] for r in timed),
           "tokens_per_step": timed[0]["tokens"], "flops_per_step": timed[0]["flops"],
           **rates(c, timed[0]["tokens"], timed[0]["flops"], med),
           "peak_mem_gib": mem_peak(c), "start_mem_gib": base, "build_s": build_s,
           "losses": [r["loss"] for r in recs]}
    return out


def phase_pool(c: Ctx) -> dict:
    from apollo_ds.flops import train_flops
    P = c.S["pool"]
    cfg = make_cfg(c, "pool_plain", P["warmup"] + P["steps"])
    fresh(cfg)
    base = mem_start(c)
    log(f"pool vs plain: {P['warmup']} warm-up + {P['steps']} timed steps each, "
        f"{P['per_turn']} per turn, ABBA ...")
    a = SimpleNamespace(warmup_steps=P["warmup"], steps=P["steps"], steps_per_turn=P["per_turn"])
    r = run_pool_plain(a, cfg, c.dist)
    gc.collect()
    peak = mem_peak(c)
    summ = summarise(r["step_times"], r["tokens_per_step"])
    flops = train_flops(cfg.model, cfg.model.layers, r["tokens_per_step"], 1)
    out = {"pool": {**summ["pool"], **rates(c, r["tokens_per_step"], flops,
                                           summ["pool"]["median_step_s"])},
           "plain": {**summ["plain"], **rates(c, r["tokens_per_step"], flops,
                                             summ["plain"]["median_step_s"])},
           "ratio_pool_over_plain": summ["ratio_pool_over_plain"],
           "ratio_pool_over_plain_paired": paired_ratio(r["step_times"], r["step_turns"]),
           "ratio_pool_over_plain_min": summ["ratio_pool_over_plain_min"],
           "max_loss_diff": r["max_loss_diff"], "n_params": r["n_params"],
           "peak_mem_gib_both_engines": peak, "start_mem_gib": base}
    out["tokens_per_s"] = out["pool"]["tokens_per_s"]
    log(f"pool vs plain: pool {out['pool']['tokens_per_s']:,.0f} tok/s, plain "
        f"{out['plain']['tokens_per_s']:,.0f} tok/s, ratio {out['ratio_pool_over_plain']:.3f}")
    return out


def phase_apollo(c: Ctx) -> dict:
    from apollo_ds.training.loop import Trainer
    P = c.S["apollo"]
    cfg = make_cfg(c, "apollo", P["steps"], apollo=P)
    fresh(cfg)
    base = mem_start(c)
    tr = Trainer(cfg, c.dist)
    recs, expansions = [], []
    try:
        for s in range(1, P["steps"] + 1):
            n = tr.schedule.unique_at(s)
            if n > tr.model.n_unique:
                n_old = tr.model.n_unique
                sync(c)
                t0 = time.perf_counter()
                tr.expand(n)   # full state out, grow, new engine, state in (what run() does)
                sync(c)
                expansions.append({"after_step": s - 1, "from": n_old, "to": n,
                                   "seconds": time.perf_counter() - t0})
            rec = tr.train_step(s)
            rec["first_of_stage"] = s == 1 or bool(expansions
                                                   and expansions[-1]["after_step"] == s - 1)
            recs.append(rec)
            log(f"apollo: step {s}/{P['steps']} N={rec['n_unique']} mean depth "
                f"{statistics.fmean(rec['depths']):.1f} loss {rec['loss']:.4f} "
                f"{rec['step_time_s']:.3f} s")
    finally:
        close(tr)
    # A stage's first step runs on a just-built engine (allocator / kernel warm-up): it is
    # left out of the reference, and its excess over the median is reported separately.
    steady = [r for r in recs if not r["first_of_stage"]]
    med = statistics.median(r["step_time_s"] for r in steady)
    firsts = [r for r in recs if r["first_of_stage"]]
    for e, r in zip(expansions, firsts[1:]):
        e["in_median_steps"] = e["seconds"] / med
        e["first_step_extra_s"] = r["step_time_s"] - med
    tokens = recs[0]["tokens"]
    flops = statistics.median(r["flops"] for r in steady)
    out = {"stages": P["stages"], "stage_ends": P["ends"], "steps": P["steps"],
           "median_step_s": med, "expansions": expansions,
           "mean_depth": statistics.fmean(dd for r in recs for dd in r["depths"]),
           **rates(c, tokens, flops, med), "peak_mem_gib": mem_peak(c), "start_mem_gib": base,
           "losses": [r["loss"] for r in recs]}
    for e in expansions:
        log(f"apollo: expansion {e['from']} -> {e['to']} after step {e['after_step']}: "
            f"{e['seconds']:.2f} s = {e['in_median_steps']:.1f} median steps")
    return out


@contextlib.contextmanager
def deterministic(c: Ctx, strict: bool):
    """Deterministic kernels for the resume comparison: without them two identical runs can
    differ by atomics' summation order, which would hide (or fake) a resume bug. SDPA is held
    to its math kernel, deterministic on every torch version (flash / memory-efficient
    backward are deterministic only on recent versions, and only in strict mode)."""
    import torch
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    # Deterministic mode also fills every torch.empty with NaN by default (so reads of
    # uninitialised memory repeat); that made the smoke run's steps 15x slower (measured) and is
    # not what this check is about.
    try:
        import torch.utils.deterministic as tdet
    except ImportError:           # torch < 2.1: no such filling
        tdet = SimpleNamespace(fill_uninitialized_memory=False)
    prev_fill = tdet.fill_uninitialized_memory
    tdet.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            kernel = sdpa_kernel([SDPBackend.MATH])
        except ImportError:       # older torch
            kernel = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True,
                                                    enable_mem_efficient=False)
        with kernel:
            yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        tdet.fill_uninitialized_memory = prev_fill
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn


def resume_runs(c: Ctx, tag: str) -> dict:
    from apollo_ds.training.loop import Trainer
    P = c.S["resume"]
    kw = dict(micro=P["micro"], global_batch=P["global_batch"], apollo=P)
    straight = make_cfg(c, f"resume_straight{tag}", P["steps"], **kw)
    part1 = make_cfg(c, f"resume_split{tag}", P["steps"], stop_after=P["stop"], **kw)
    part2 = make_cfg(c, f"resume_split{tag}", P["steps"], **kw)
    fresh(straight), fresh(part1)

    def run(cfg, before=lambda tr: None):
        tr = Trainer(cfg, c.dist)
        try:     # engines freed even when a run fails (the caller may retry)
            info = before(tr)
            tr.run()
        finally:
            close(tr)
        return info

    def report(tr):
        log(f"resume: resumed at step {tr.step} with {tr.model.n_unique} unique layers, "
            f"running to {P['steps']}")
        return tr.step

    t0 = time.perf_counter()
    log(f"resume: straight run, {P['steps']} steps")
    run(straight)
    log(f"resume: split run, steps 1..{P['stop']} then stop")
    run(part1)
    resumed_at = run(part2, report)
    if resumed_at != P["stop"]:
        raise RuntimeError(f"resume: the second part started at step {resumed_at}, not at the "
                           f"checkpoint of step {P['stop']}")
    a, b = read_losses(straight.train.out_dir), read_losses(part2.train.out_dir)
    if sorted(a) != sorted(b) or sorted(a) != list(range(1, P["steps"] + 1)):
        raise RuntimeError(f"resume: steps differ: {sorted(a)} vs {sorted(b)}")
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in sorted(a)]
    last = P["steps"]
    med = statistics.median(r["step_time_s"] for r in a.values())
    tokens = a[1]["tokens"]
    return {"steps": P["steps"], "stop_after": P["stop"], "resumed_at": resumed_at,
            "stages": P["stages"], "stage_ends": P["ends"],
            "max_abs_loss_diff": max(diffs),
            "eval_loss_diff": abs(a[last].get("eval_loss", math.nan)
                                  - b[last].get("eval_loss", math.nan)),
            "losses_straight": [a[s]["loss"] for s in sorted(a)],
            "losses_resumed": [b[s]["loss"] for s in sorted(b)],
            "median_step_s": med, "tokens_per_s": tokens / med,
            "wall_s": time.perf_counter() - t0}


def phase_resume(c: Ctx) -> dict:
    base = mem_start(c)
    try:
        try:
            with deterministic(c, strict=True):
                out = resume_runs(c, "")
            out["determinism"] = "strict"
        except RuntimeError as e:
            if "determinist" not in str(e):
                raise
            # An op without a deterministic kernel on this torch: say which, compare anyway.
            log(f"resume: strict determinism refused an op ({str(e).splitlines()[0][:200]}); "
                f"rerunning with warn_only")
            with deterministic(c, strict=False):
                out = resume_runs(c, "_warn")
            out["determinism"] = "warn_only"
            out["strict_error"] = str(e)[:2000]
    finally:
        if not c.keep:     # ~1.7 GB per checkpoint at the GPU shape
            for name in ("resume_straight", "resume_split", "resume_straight_warn",
                         "resume_split_warn"):
                shutil.rmtree(os.path.join(c.work, "runs", name, "checkpoints"),
                              ignore_errors=True)
    out["attention_kernel"] = "sdpa math"
    out["peak_mem_gib"], out["start_mem_gib"] = mem_peak(c), base
    log(f"resume: max |loss straight - loss resumed| = {out['max_abs_loss_diff']:.3g} over "
        f"{out['steps']} steps ({out['determinism']})")
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    out = os.path.abspath(a.out)          # relative to where it was started, not the repo
    work = os.path.abspath(a.work_dir)
    os.chdir(REPO)                         # ds_configs/ and data_prep/ are repo-relative
    if a.smoke:
        os.environ["DS_ACCELERATOR"] = "cpu"
    # before torch initialises cuBLAS: the resume phase's deterministic matmuls need it
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("gpu_check.py: error: run it as one process (not under a launcher)")
    # One rank of its own: the environment torch.distributed reads, on a free port.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    import torch
    if not a.smoke:
        if os.environ.get("DS_ACCELERATOR") == "cpu":
            raise SystemExit("gpu_check.py: error: DS_ACCELERATOR=cpu forces the CPU; unset it "
                             "(or use --smoke for the CPU path)")
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check.py: error: no CUDA device; --smoke runs the same code "
                             "on the CPU")
    S = MODES["smoke" if a.smoke else "gpu"]
    log(f"mode {'smoke (CPU)' if a.smoke else 'GPU'}; phases {','.join(a.phase_list)}; "
        f"work dir {work}")
    data = make_data(work, S["tokenizer_vocab"], S["text_lines"], log)

    import deepspeed

    from apollo_ds import distributed
    dist = distributed.init(1, 1)
    cuda = dist.on_cuda
    name = torch.cuda.get_device_name(dist.device) if cuda else "CPU"
    if a.peak_tflops:
        peak, source = a.peak_tflops, "--peak-tflops"
    elif cuda:
        peak, source = peak_for(name)
        source += f" for '{name}'"
    else:
        peak, source = None, "CPU: MFU n/a"
    log(f"device {name}; peak {fmt(peak, '.0f')} TFLOP/s ({source})")
    c = Ctx(S=S, data=data, dist=dist, cuda=cuda, peak=peak, work=work, keep=a.keep_work)
    try:
        import megatron.core
        mc_version = getattr(megatron.core, "__version__", None)
    except ImportError:
        mc_version = None
    res = {"smoke": a.smoke, "device": name, "peak_tflops": peak, "peak_source": source,
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                        "deepspeed": deepspeed.__version__, "megatron_core": mc_version,
                        "python": sys.version.split()[0]},
           "capability": list(torch.cuda.get_device_capability(dist.device)) if cuda else None,
           "shape": {"model": S["model"], "micro": S["micro"], "global_batch": S["global_batch"],
                     "ds_config": S["ds_config"]},
           "data": {k: v for k, v in data.items() if k != "cache_dir"},
           "phases": {}, "phase_wall_s": {}, "elapsed_s": 0.0, "complete": False}
    runs = []
    if "tput" in a.phase_list:
        runs += [(key, lambda key=key, opts=opts: phase_tput(c, key, opts))
                 for key, opts in TPUT]
    if "pool" in a.phase_list:
        runs.append(("pool_vs_plain", lambda: phase_pool(c)))
    if "apollo" in a.phase_list:
        runs.append(("apollo", lambda: phase_apollo(c)))
    if "resume" in a.phase_list:
        runs.append(("resume", lambda: phase_resume(c)))
    def save() -> None:
        # after every phase: a run cut short by the machine's time limit keeps what it measured
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(out + ".tmp", out)

    failed = []
    for key, fn in runs:
        log(f"phase {key} ...")
        t0 = time.perf_counter()
        try:
            res["phases"][key] = fn()
        except Exception as e:  # noqa: BLE001 - one device run: keep the other phases' results
            failed.append(key)
            res["phases"][key] = {"error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-4000:]}
            log(f"phase {key} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        res["phase_wall_s"][key] = time.perf_counter() - t0
        log(f"phase {key} done in {res['phase_wall_s'][key]:.1f} s")
        gc.collect()
        res["elapsed_s"] = time.perf_counter() - t_start
        save()
    res["complete"] = True
    save()
    print_table(res)
    print(f"wrote {out}")
    distributed.shutdown()
    if failed:
        print(f"gpu_check.py: failed phases: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
