#!/usr/bin/env python3
"""Throughput of the pooled model at full depth against a plain sequential GPT.

    .venv/bin/python benchmarks/throughput.py [--data-prefix P --tokenizer T] [--steps N]
        [--quick] [--out FILE.json] [--layouts tp1[,tp2]] [--nproc 2]

What is compared, in ONE process group (one run):
  pool   apollo_ds.model.PoolGPT with L unique layers, run with the layer map [0..L-1]
         (what Apollo's last stage, and a scratch run, execute).
  plain  the same GPT built from the same ``apollo_ds.model.gpt.Block`` class, its L layers in
         an nn.ModuleList run in order, with no layer map.
Both start from the same weights (the plain model loads the pool model's state dict), train on
the same micro-batches with the same DeepSpeed config (ZeRO 1 fp32, torch AdamW from
apollo_ds.training.engine) and batch. Steps are interleaved in rounds, ABBA BAAB ..., so slow
phases of a shared machine hit both models equally; per-step times after warm-up are
summarised by their median. The goal is pool/plain >= 0.97.

Layouts (``--layouts``): each layout is a (tp, pp) split of the same process count, e.g.
``tp1`` (tp=1: data parallel over all processes) and ``tp2`` (tensor parallel 2). Pool and
plain are compared inside each layout. megatron-core's parallel state is global to a process,
so different layouts cannot share one process: with several layouts this script starts one
worker process group (torchrun) per (layout, round), alternating layouts round by round, and
pools the per-step times.

Pipeline layouts (``pp2``, ``tp1pp2``, ...) and the Trainer route: PoolGPT cannot be split
into stages, so a pp>1 layout is measured by timing ``apollo_ds.training.loop.Trainer.
train_step`` (Apollo off: full depth L, layer map [0..L-1]; for pp>1 it dispatches to
apollo_ds.model.pipeline, a DeepSpeed PipelineModule run by ``engine.train_batch``). Same model
size, micro-batch, global batch, DeepSpeed config and seed as the pool/plain comparison. So
that layouts are compared like with like, ``--trainer-route auto`` (default) times the same
Trainer.train_step in EVERY layout as soon as one layout has pp>1 (pp=1 layouts still run the
pool/plain comparison too); the "trainer tokens/s X / Y" lines compare that route only. The
Trainer route loads its micro-batches inside the step (the pool/plain route preloads them).

Pipeline bubble: DeepSpeed's TrainSchedule (1F1B) runs m micro-batches over S stages in
m+S-1 slots per direction, so the idle (bubble) fraction is (S-1)/(m+S-1) (printed as
"analytic"). ``--bubble-fit`` (default on with the Trainer route) also times a second Trainer
with the global batch doubled (2m micro-batches of the same size, interleaved ABBA with the m
one) and fits t(m) = a*(m+b): a = (t(2m)-t(m))/m, b = t(m)/a - m, "measured" = b/(m+b). b
lumps every per-step fixed cost (optimizer step, gradient all-reduce, pipeline start-up) with
the bubble, so read the pp>1 value against the pp=1 layouts' b (no bubble there).

A single-process run (the default, ``--nproc 1``) creates a 1-rank gloo group (CPU) via
apollo_ds.distributed.init, which also sets up megatron-core's parallel_state.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DEFAULT_PREFIX = ".cache/apollo_ds/data/corpus"
DEFAULT_TOKENIZER = ".cache/apollo_ds/data/spm8k.model"

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:     # also when imported by another script or run with python -m
    sys.path.insert(0, HERE)
from plain_gpt import make_plain_class  # noqa: E402
from throughput_report import (merge, paired_ratio, print_table,  # noqa: E402
                               print_trainer_table, summarise, summarise_trainer)

__all__ = ["make_plain_class", "merge", "paired_ratio", "print_table", "print_trainer_table",
           "summarise", "summarise_trainer", "run_pool_plain", "run_trainer_route"]


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-prefix", default=DEFAULT_PREFIX)
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps per model (after warm-up); default 40, --quick 6")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="untimed steps per model first; default 3, --quick 1")
    p.add_argument("--steps-per-turn", type=int, default=2,
                   help="consecutive steps of one model before switching (ABBA order)")
    p.add_argument("--quick", action="store_true", help="few steps, small model: a smoke test")
    p.add_argument("--layers", type=int, default=None, help="full depth L (default 6)")
    p.add_argument("--hidden", type=int, default=None, help="default 192")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="model vocabulary (default: the tokenizer's)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--deepspeed-config", default="ds_configs/zero1_fp32.json")
    p.add_argument("--layouts", default="tp1",
                   help="comma list of layouts: tp1, tp2, pp2, tp1pp2, ... (pp>1 is timed "
                        "through Trainer.train_step). Layouts need --nproc a multiple of tp*pp")
    p.add_argument("--trainer-route", choices=("auto", "on", "off"), default="auto",
                   help="also time Trainer.train_step in every layout (auto: when a layout "
                        "has pp>1, which needs it)")
    p.add_argument("--bubble-fit", choices=("auto", "on", "off"), default="auto",
                   help="Trainer route: also time 2m micro-batches per step to fit the "
                        "per-step fixed cost / pipeline bubble (auto: on with the route)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes per layout (torchrun; 1: this process only)")
    p.add_argument("--layout-rounds", type=int, default=2,
                   help="with several layouts: worker launches per layout, alternated")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: cores // nproc)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--compile", action="store_true",
                   help="train.compile=true: every arm's blocks torch.compile'd")
    p.add_argument("--no-ddp", dest="ddp", action="store_false",
                   help="leave out the plain torch DDP loop arm (tp=1, ZeRO 0/1, fp32 only)")
    p.add_argument("--ddp-fused", action="store_true",
                   help="the DDP arm's AdamW fused on CPU too, as the stack's is (default: "
                        "nanoGPT's choice, fused on CUDA only)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-layout", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps is None:
        a.steps = 6 if a.quick else 40
    if a.warmup_steps is None:
        a.warmup_steps = 1 if a.quick else 3
    if a.layers is None:
        a.layers = 4 if a.quick else 6
    if a.hidden is None:
        a.hidden = 128 if a.quick else 192
    if a.steps < 1 or a.warmup_steps < 0 or a.steps_per_turn < 1:
        p.error("--steps must be >= 1, --warmup-steps >= 0, --steps-per-turn >= 1")
    a.layout_list = [parse_layout(x) for x in a.layouts.split(",") if x.strip()]
    if not a.layout_list:
        p.error("--layouts is empty")
    any_pp = any(pp > 1 for _, _, pp in a.layout_list)
    if a.trainer_route == "off" and any_pp:
        p.error("pp>1 layouts are measured only through the Trainer route (--trainer-route)")
    a.use_trainer = a.trainer_route == "on" or (a.trainer_route == "auto" and any_pp)
    a.use_bubble_fit = a.use_trainer and a.bubble_fit != "off"
    for name, tp, pp in a.layout_list:
        if a.nproc % (tp * pp):
            p.error(f"layout {name} needs a process count that is a multiple of tp*pp="
                    f"{tp * pp}; --nproc is {a.nproc}")
    return a


def parse_layout(text: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"\s*(?:tp(\d+))?(?:pp(\d+))?\s*", text)
    if not m or not (m.group(1) or m.group(2)):
        raise SystemExit(f"throughput.py: error: bad layout '{text}': write tp2, tp1pp2, ...")
    tp, pp = int(m.group(1) or 1), int(m.group(2) or 1)
    return f"tp{tp}pp{pp}", tp, pp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- worker
def build_cfg(a, tp: int, pp: int, vocab: int, extra=(), global_batch=None):
    from apollo_ds.config import load_config
    over = [f"model.layers={a.layers}", f"model.hidden={a.hidden}", f"model.heads={a.heads}",
            f"model.seq_len={a.seq_len}", f"model.vocab_size={vocab}",
            f"parallel.tp={tp}", f"parallel.pp={pp}",
            f"data.prefix={a.data_prefix}", f"data.tokenizer={a.tokenizer}",
            f"data.cache_dir={os.path.join(REPO, '.cache', 'apollo_ds', 'bench', 'index_cache')}",
            f"train.micro_batch={a.micro_batch}",
            f"train.global_batch={global_batch or a.global_batch}",
            f"train.steps={a.warmup_steps + a.steps}", "train.lr=0.001", "train.warmup=0",
            f"train.seed={a.seed}", f"train.deepspeed_config={a.deepspeed_config}",
            "train.optimizer=adamw", f"train.out_dir={tempfile.gettempdir()}/apollo_tput",
            f"train.compile={'true' if getattr(a, 'compile', False) else 'false'}"]
    return load_config(None, over + list(extra))


def run_worker(a, layout) -> dict:
    """Measure pool vs plain in this process group (1 process, or torchrun ranks)."""
    name, tp, pp = layout
    # the machine's accelerator (CUDA when it works; DS_ACCELERATOR=cpu forces the CPU)
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    elif int(os.environ["WORLD_SIZE"]) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))

    from apollo_ds import distributed
    from apollo_ds.config import ConfigError, validate
    from apollo_ds.data import check_data_inputs
    try:
        vocab = a.vocab_size or check_data_inputs(build_cfg(a, tp, pp, 1 << 20))
        cfg = build_cfg(a, tp, pp, vocab)
        validate(cfg, world_size=int(os.environ["WORLD_SIZE"]))
    except ConfigError as e:
        raise SystemExit(f"throughput.py: error: {e}") from None
    d = distributed.init(tp, pp)
    rank0 = d.rank == 0
    res = {"layout": name, "tp": d.tp, "pp": d.pp, "dp": d.dp, "world": d.world,
           "threads": torch.get_num_threads(),
           "tokens_per_step": cfg.train.global_batch * cfg.model.seq_len,
           "model": vars(cfg.model).copy(), "micro_batch": cfg.train.micro_batch,
           "global_batch": cfg.train.global_batch, "warmup_steps": a.warmup_steps,
           "measured_steps": a.steps}
    if pp == 1:
        res.update(run_pool_plain(a, cfg, d))
    if a.use_trainer:
        res["trainer"] = run_trainer_route(a, tp, pp, vocab, d)
    return res if rank0 else {}


def run_pool_plain(a, cfg, d) -> dict:
    """Pool vs plain at full depth in this process group (``d``: apollo_ds.distributed.Dist),
    ABBA-interleaved; ``a`` needs warmup_steps, steps and steps_per_turn. Also used by
    gpu_check.py."""
    import torch

    from apollo_ds import distributed
    from apollo_ds.data import build_datasets, get_micro_batch
    from apollo_ds.model import PoolGPT, init_weights
    from apollo_ds.training.engine import build_engine, load_ds_config, lr_at, set_lr
    t = cfg.train
    grad_accum = t.global_batch // (t.micro_batch * d.dp)
    total_steps = a.warmup_steps + a.steps
    train_ds, _ = build_datasets(cfg, total_steps * t.global_batch, 0)
    ds_cfg = load_ds_config(cfg, d.dp)
    mpu = distributed.MegatronMPU()

    pool = PoolGPT(cfg.model, cfg.model.layers, dtype=torch.float32)
    init_weights(pool, t.seed, cfg.model.init_std, cfg.model.layers, cfg.model.vocab_size)
    plain = make_plain_class()(cfg.model)
    plain.load_from_pool(pool)
    pool.to(d.device), plain.to(d.device)
    n_params = sum(p.numel() for p in pool.parameters())
    assert n_params == sum(p.numel() for p in plain.parameters())
    engines = {"pool": build_engine(pool, ds_cfg, cfg, mpu, d),
               "plain": build_engine(plain, ds_cfg, cfg, mpu, d)}
    lmap = list(range(cfg.model.layers))
    calls = {"pool": lambda e, b: e(b["tokens"], lmap, b["labels"], b["loss_mask"]),
             "plain": lambda e, b: e(b["tokens"], b["labels"], b["loss_mask"])}
    # "ddp": the plain model in a plain torch loop, nanoGPT style (DistributedDataParallel,
    # torch AdamW, clip_grad_norm_), no DeepSpeed: the stack's cost against none at all
    ddp = None
    if getattr(a, "ddp", False) and d.tp == 1 and ds_cfg.get("zero_optimization", {}).get(
            "stage", 0) <= 1 and not ds_cfg.get("bf16", {}).get("enabled"):
        ddp = make_ddp_arm(cfg, pool, d, fused=getattr(a, "ddp_fused", False))
    # Pre-load every micro-batch once so data loading is outside the timed region.
    batches = {}
    for step in range(1, total_steps + 1):
        base = (step - 1) * t.global_batch
        for k in range(grad_accum):
            j = k * d.dp + d.dp_rank
            b = get_micro_batch(train_ds, base + j * t.micro_batch, t.micro_batch)
            batches[step, k] = {kk: v.to(d.device) for kk, v in b.items()}

    def one_step(which: str, step: int) -> tuple[float, float, float]:
        torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        if which == "ddp":
            for g in ddp["opt"].param_groups:
                g["lr"] = lr_at(step, cfg)
            for k in range(grad_accum):
                sync = ddp["model"].no_sync() if k + 1 < grad_accum else contextlib.nullcontext()
                with sync:
                    b = batches[step, k]
                    loss = ddp["model"](b["tokens"], b["labels"], b["loss_mask"])
                    (loss / grad_accum).backward()
                loss_sum += loss.detach().double()
            torch.nn.utils.clip_grad_norm_(ddp["params"], t.grad_clip)
            ddp["opt"].step()
            ddp["opt"].zero_grad(set_to_none=True)
        else:
            eng = engines[which]
            set_lr(eng, lr_at(step, cfg))
            for k in range(grad_accum):
                loss = calls[which](eng, batches[step, k])
                eng.backward(loss)
                eng.step()
                loss_sum += loss.detach().double()
        # One host sync per step, inside the timed region (as the Trainer does): on CUDA it
        # waits for the step's kernels, and it spares a sync per micro-batch.
        loss_val = loss_sum.item()
        # the slowest rank defines the step (the helper puts it where the backend wants it);
        # CPU seconds of the process too: on a shared machine they grow far less with load
        # than wall time (with --threads 1 they are the step's compute)
        dt, cpu = distributed.all_reduce([time.perf_counter() - t0, time.process_time() - c0],
                                         op="max").tolist()
        return dt, cpu, loss_val / grad_accum

    arms = ["pool", "plain"] + (["ddp"] if ddp else [])
    times = {k: [] for k in arms}
    cpu_times = {k: [] for k in arms}
    turns = {k: [] for k in arms}      # turn index of every timed step (for pairing)
    losses = {k: [] for k in arms}
    next_step = dict.fromkeys(arms, 1)
    order, turn = [], 0
    # ABBA BAAB ...: each model goes first equally often and drifts cancel to first order
    while min(next_step.values()) <= total_steps:
        pair = arms if turn % 4 in (0, 3) else arms[::-1]
        for which in pair:
            for _ in range(a.steps_per_turn):
                s = next_step[which]
                if s > total_steps:
                    break
                dt, cpu, loss = one_step(which, s)
                next_step[which] = s + 1
                losses[which].append(loss)
                if s > a.warmup_steps:
                    times[which].append(dt)
                    cpu_times[which].append(cpu)
                    turns[which].append(turn)
                    order.append(which)
        turn += 1
    # Same weights, data and optimizer: the two losses must agree (up to float reassociation).
    max_loss_diff = max(abs(x - y) for k in arms[1:] for x, y in zip(losses["pool"], losses[k]))
    tokens = t.global_batch * cfg.model.seq_len
    return {"n_params": n_params, "tokens_per_step": tokens,
            "step_times": times, "step_cpu_times": cpu_times, "step_turns": turns,
            "losses": losses,
            "max_loss_diff": max_loss_diff,
            "order": "".join({"pool": "A", "plain": "B", "ddp": "C"}[o] for o in order)}


def make_ddp_arm(cfg, pool, d, fused: bool = False) -> dict:
    """The plain model (pool's weights) under torch DDP over the data-parallel group, torch
    AdamW (fused on CUDA, as nanoGPT; ``fused``: on CPU too) with apollo_ds's decay groups,
    blocks compiled with train.compile."""
    import torch
    from megatron.core import parallel_state

    from apollo_ds.model.gpt import Block
    from apollo_ds.training.engine import param_groups
    t = cfg.train
    model = make_plain_class()(cfg.model)
    model.load_from_pool(pool)
    model.to(d.device)
    if t.compile:
        from apollo_ds.model.compile import compile_blocks
        compile_blocks(model, (Block,))
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.device.index] if d.on_cuda else None,
        process_group=parallel_state.get_data_parallel_group())
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                            betas=(t.beta1, t.beta2), eps=1e-8, fused=d.on_cuda or fused)
    return {"model": ddp, "opt": opt, "params": list(model.parameters())}


def run_trainer_route(a, tp: int, pp: int, vocab: int, d) -> dict:
    """Time Trainer.train_step (Apollo off: full depth) at global batch B ("m") and, with
    --bubble-fit, at 2B ("2m": twice the micro-batches of the same size), ABBA-interleaved."""
    import torch

    from apollo_ds.distributed import all_reduce
    from apollo_ds.training.loop import Trainer
    total = a.warmup_steps + a.steps
    out_dir = os.path.join(tempfile.gettempdir(),
                           f"apollo_tput_trainer_{os.environ.get('MASTER_PORT', '0')}")
    arms = {"m": a.global_batch}
    if a.use_bubble_fit:
        arms["2m"] = 2 * a.global_batch
    trainers = {}
    for arm, gb in arms.items():
        cfg = build_cfg(a, tp, pp, vocab, global_batch=gb,
                        extra=["apollo.enabled=false", "train.check_plan_agreement=false",
                               f"train.out_dir={out_dir}_{arm}", "train.save_interval=0",
                               "train.eval_interval=0"])
        trainers[arm] = Trainer(cfg, d)
    n_params = sum(p.numel() for p in trainers["m"].model.parameters())
    if pp > 1:      # each stage holds its part (tied embeddings counted on both ends)
        # (float64 holds parameter counts exactly; the helper picks the backend's device)
        n_params = int(all_reduce([n_params]).item()) // d.dp
    times = {k: [] for k in arms}
    turns = {k: [] for k in arms}
    losses = {k: [] for k in arms}
    nxt = {k: 1 for k in arms}
    names = list(arms)
    turn = 0
    while min(nxt.values()) <= total:
        pair = names if turn % 4 in (0, 3) else names[::-1]
        for arm in pair:
            for _ in range(a.steps_per_turn):
                s = nxt[arm]
                if s > total:
                    break
                torch.distributed.barrier()
                t0 = time.perf_counter()
                rec = trainers[arm].train_step(s)
                dt = all_reduce([time.perf_counter() - t0], op="max").item()
                nxt[arm] = s + 1
                losses[arm].append(rec["loss"])
                if s > a.warmup_steps:
                    times[arm].append(dt)
                    turns[arm].append(turn)
        turn += 1
    tr = trainers["m"]
    return {"step_times": times, "step_turns": turns, "losses": losses,
            "micro_batches_per_step": {k: trainers[k].grad_accum for k in arms},
            "stages": d.pp, "n_params_total": n_params,
            "tokens_per_step": {k: gb * tr.cfg.model.seq_len for k, gb in arms.items()}}


# ----------------------------------------------------------------------------- driver
def launch_worker(a, argv, layout_name: str, out_json: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
           "--master_port", str(free_port()), os.path.abspath(__file__), *argv,
           "--worker", "--worker-layout", layout_name, "--out", out_json,
           # (the worker sees only its own layout: pass the route decided over all layouts)
           "--trainer-route", "on" if a.use_trainer else "off",
           "--bubble-fit", "on" if a.use_bubble_fit else "off"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads or max(1, (os.cpu_count() or 1) // a.nproc)),
               PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-6000:])
        raise SystemExit(f"throughput.py: worker for {layout_name} failed ({r.returncode})")
    with open(out_json) as f:
        return json.load(f)


def strip_driver_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        # (--nproc must not reach torchrun's own argument parser, which would take it for
        # an abbreviation of --nproc-per-node; workers read WORLD_SIZE instead)
        if x in ("--out", "--layouts", "--layout-rounds", "--nproc"):
            skip = True
            continue
        if x.startswith(("--out=", "--layouts=", "--layout-rounds=", "--nproc=")):
            continue
        out.append(x)
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    os.chdir(REPO)
    if a.worker:
        layout = parse_layout(a.worker_layout)
        res = run_worker(a, layout)
        if res:
            with open(a.out, "w") as f:
                json.dump(res, f)
        return 0

    t0 = time.time()
    results = []
    if a.nproc == 1 and len(a.layout_list) == 1:
        layout = a.layout_list[0]
        if layout[1] * layout[2] != 1:
            raise SystemExit("throughput.py: error: tp/pp > 1 needs --nproc >= tp*pp")
        r = run_worker(a, layout)
        r.pop("losses", None)
        r.get("trainer", {}).pop("losses", None)
        r["launches"] = 1
        results.append(r)
        mode = "1 process (in-process, 1-rank gloo group)"
    else:
        worker_argv = strip_driver_args(argv)
        parts = {name: [] for name, _, _ in a.layout_list}
        rounds = a.layout_rounds if len(a.layout_list) > 1 else 1
        with tempfile.TemporaryDirectory() as tmp:
            for rd in range(rounds):
                seq = a.layout_list if rd % 2 == 0 else a.layout_list[::-1]
                for name, _, _ in seq:
                    print(f"round {rd + 1}/{rounds}: layout {name} on {a.nproc} processes ...",
                          flush=True)
                    out = os.path.join(tmp, f"{name}_{rd}.json")
                    parts[name].append(launch_worker(a, worker_argv, name, out))
        results = [merge(parts[name]) for name, _, _ in a.layout_list]
        mode = (f"{a.nproc} processes per layout (torchrun, gloo), "
                f"{rounds} alternating launch(es) per layout")
    for r in results:
        if "trainer" in r:
            r["trainer"]["summary"] = summarise_trainer(r["trainer"])
        if "step_times" not in r:
            continue
        r["summary"] = summarise(r["step_times"], r["tokens_per_step"], r.get("step_cpu_times"))
        r["summary"]["ratio_pool_over_plain_paired"] = paired_ratio(r["step_times"],
                                                                    r["step_turns"])
    m = results[0]["model"]
    n_params = next((r["n_params"] for r in results if "n_params" in r),
                    results[0].get("trainer", {}).get("n_params_total", 0))
    print(f"\nthroughput: pool (layer map [0..L-1]) vs plain sequential GPT; {mode}")
    print(f"model L={m['layers']} hidden={m['hidden']} heads={m['heads']} seq={m['seq_len']} "
          f"vocab={m['vocab_size']} ({n_params / 1e6:.2f} M params), "
          f"micro {results[0]['micro_batch']} global {results[0]['global_batch']}, "
          f"{a.deepspeed_config}, torch AdamW; {a.warmup_steps} warm-up + {a.steps} timed "
          f"steps per model, {a.steps_per_turn} per turn, ABBA order; "
          f"{results[0]['threads']} torch threads/process")
    print_table(results)
    print_trainer_table(results)
    summary = {"mode": mode, "args": {k: v for k, v in vars(a).items() if k != "layout_list"},
               "elapsed_s": time.time() - t0, "results": results}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
