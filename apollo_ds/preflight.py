"""Every input of a run checked before any work starts: pretrain.py calls ``check_inputs`` in
each process before process groups, engines or datasets exist. Config and DeepSpeed config,
launch environment, output directory (rank 0 locks it for the life of the run: one writer),
data and tokenizer, and the checkpoint a rerun would resume from. A refusal is one ConfigError
line naming the file or setting and the fix (pretrain.py exits 2). Nothing is written but the
run lock (on a refusal its file is removed again, or its old text restored): the out_dir probe
creates and removes one temporary file; checkpoints are checked against their manifest's sizes
(the checksums are verified later, split over the ranks)."""
from __future__ import annotations

import errno
import os
import socket
import tempfile

from apollo_ds import rundir
from apollo_ds.config import ConfigError, RunConfig, validate

ACCELERATORS = ("cuda", "cpu")


def check_inputs(cfg: RunConfig, world: int | None = None, rank: int = 0,
                 env=os.environ) -> None:
    from apollo_ds.data import check_data_inputs
    from apollo_ds.data.datasets import parse_blend
    from apollo_ds.value_checks import (check_data_contents, check_disk, check_launch_shape,
                                        check_memory, check_values)
    from apollo_ds.training.engine import load_ds_config, model_dtype, zero_stage
    check_values(cfg)   # the values' own types and ranges, before validate() combines them
    validate(cfg, world_size=world)
    check_launch_shape(cfg, world)
    p = cfg.parallel
    dp = (world or 1) // (p.tp * p.pp)
    ds = load_ds_config(cfg, dp)
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    check_memory(cfg, world, zero_stage(ds), bf16, env)
    from apollo_ds.training.run_log import check_monitors
    check_monitors(ds, cfg.train.deepspeed_config)   # wandb enabled: installed?
    check_launch_env(env, rank)
    check_writable("train.out_dir", cfg.train.out_dir)
    check_disk(cfg, bf16)
    if cfg.data.cache_dir:
        check_writable("data.cache_dir", cfg.data.cache_dir)
    # one writer per run directory, taken before the checkpoint is read (another run could be
    # writing it); a refusal below leaves the disk as it was
    lock = lock_run_dir(cfg.train.out_dir) if rank == 0 else None
    try:
        check_data_inputs(cfg)
        for prefix in parse_blend(cfg.data.prefix)[0]:
            check_data_contents(prefix, cfg.model.vocab_size, cfg.data.cache_dir or None)
        layout = {"dp": dp, "tp": p.tp, "pp": p.pp, "zero": zero_stage(ds),
                  "dtype": str(model_dtype(ds))}
        check_resume(cfg, layout, layout_known=world is not None)
        from apollo_ds import init_from
        init_from.check_fresh(cfg)   # train.init_from: the source opens and its shapes map
    except BaseException:
        if lock is not None:
            lock.release(undo=True)
        raise


# ------------------------------------------------------------------ launch environment
def _first_int(text: str | None) -> int | None:
    """'4' or Slurm's '4(x2)' -> 4."""
    head = (text or "").split("(")[0].split(",")[0].strip()
    return int(head) if head.isdigit() else None


def check_launch_env(env=os.environ, rank: int = 0) -> None:
    acc = env.get("DS_ACCELERATOR")
    if acc is not None and acc not in ACCELERATORS:
        raise ConfigError(f"DS_ACCELERATOR={acc} is not supported; use cuda or cpu, or unset "
                          f"it (CUDA when torch finds a GPU, else the CPU)")
    if acc != "cpu":
        gpus = _first_int(env.get("SLURM_GPUS_ON_NODE"))
        tasks = _first_int(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"))
        if gpus is not None and tasks is not None and tasks > gpus:
            raise ConfigError(f"Slurm starts {tasks} tasks on a node with {gpus} GPUs "
                              f"(SLURM_NTASKS_PER_NODE / SLURM_GPUS_ON_NODE): one task per "
                              f"GPU; use sbatch --ntasks-per-node={gpus} or --gpus-per-node="
                              f"{tasks} (or DS_ACCELERATOR=cpu for CPU tasks)")
    if acc == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"DS_ACCELERATOR=cuda but torch {torch.__version__} finds no CUDA "
                              f"device (CUDA_VISIBLE_DEVICES="
                              f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}); run on a GPU node "
                              f"with a CUDA build of torch, or set DS_ACCELERATOR=cpu")
    _check_master_port(env, rank)


def _check_master_port(env, rank: int) -> None:
    """Rank 0 hosts torch.distributed's TCP store on MASTER_PORT (except under torchrun, whose
    agent already holds it): a port another process listens on would fail only after a
    rendezvous timeout."""
    port = env.get("MASTER_PORT", "")
    if rank != 0 or "TORCHELASTIC_RUN_ID" in env or not port:
        return
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a port number; pick a free port "
                          f"(1024-65535)")
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    try:
        infos = socket.getaddrinfo(addr, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return  # unresolvable here: torch.distributed names the problem itself
    with socket.socket() as probe:
        try:
            probe.bind((infos[0][4][0], 0))
        except OSError:
            return  # MASTER_ADDR is another host: its rank 0 binds there
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"MASTER_PORT={port} is already in use on {addr} (another "
                                  f"job or a leftover process); pick a free port, e.g. "
                                  f"MASTER_PORT={_free_port()}") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ output directory
def check_writable(setting: str, path: str) -> None:
    """``path`` exists as a writable directory, or can be created under its nearest existing
    ancestor; probed with a temporary file (permission bits alone say nothing to root)."""
    target = os.path.abspath(path)
    base = target
    while not os.path.exists(base):
        base = os.path.dirname(base)
    if not os.path.isdir(base):
        raise ConfigError(f"{setting}={path} cannot be created: {base} is a file, not a "
                          f"directory; choose another {setting}")
    try:
        fd, tmp = tempfile.mkstemp(dir=base, prefix=".apollo_ds_probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{setting}={path} is not writable ({base}: {e.strerror}); choose a "
                          f"writable {setting}") from None


# ------------------------------------------------------------------ the checkpoint to resume
def check_resume(cfg: RunConfig, layout: dict, layout_known: bool = True) -> None:
    """The checkpoint find_latest would pick (newest first, falling back as it does) must
    exist in full and be one this run can continue (training.resume.check). Without a
    launcher-reported world size the layout is a guess: its checks are left to the Trainer."""
    from apollo_ds.training import resume
    ckpt_dir = rundir.checkpoints_dir(cfg.train.out_dir)
    tags, note = rundir.candidates(ckpt_dir)
    if not tags and note is None:
        return
    first = None
    for tag in tags:
        tag_dir = os.path.join(ckpt_dir, tag)
        problem = rundir.manifest_problem(tag_dir, share=None)   # sizes: checksums come later
        if problem is None:
            break
        first = first or f"{tag}: {problem}"
    else:
        head = note or f"{rundir.LATEST} names {rundir.read_latest(ckpt_dir)}"
        first = first or "nothing to try"
        raise ConfigError(f"no valid checkpoint in {ckpt_dir} ({head}; {first}; no older one is "
                          f"complete); restore the file or move {ckpt_dir} away to start fresh")
    state = rundir.read_run_state(tag_dir)
    verdict = resume.check(state, cfg, layout, tag_dir)
    if verdict.same_layout or not layout_known:
        return
    if not rundir.has_params(tag_dir):
        raise ConfigError(f"checkpoint {tag_dir} has no layout-free state ({rundir.PARAMS}/),"
                          f" so it resumes only under the layout that wrote it: "
                          f"{state.get('layout')}; launch that layout")


# ------------------------------------------------------------------ one run per out_dir
_held: rundir.RunLock | None = None


def lock_run_dir(out_dir: str) -> rundir.RunLock:
    """Rank 0 locks OUT_DIR/run.lock for the rest of the process (a second run there is
    refused, naming the holder). A lock this process took earlier (in-process callers) is
    released first."""
    global _held
    if _held is not None:
        _held.release()
    _held = rundir.RunLock(out_dir).acquire()
    return _held
