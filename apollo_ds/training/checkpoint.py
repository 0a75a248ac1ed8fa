"""Checkpoints: DeepSpeed's engine checkpoint (model, optimizer partitions) plus the run's own
state (step, consumed samples, pool size, stage) in ``run_state.json``.

A tag directory is complete only once every rank has written its files; ``latest`` is replaced
atomically after a barrier, so a run killed mid-save resumes from the previous checkpoint and
nothing written before is lost."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import torch

from apollo_ds.config import ConfigError, ModelConfig

RUN_STATE = "run_state.json"
LATEST = "latest"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def save(engine, ckpt_dir: str, run_state: dict, rank: int) -> str:
    tag = tag_for(run_state["step"])
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"apollo_run_state": run_state},
                           save_latest=False)
    torch.distributed.barrier()
    if rank == 0:
        _atomic_write(os.path.join(ckpt_dir, tag, RUN_STATE), json.dumps(run_state, indent=1))
        _atomic_write(os.path.join(ckpt_dir, LATEST), tag)
    torch.distributed.barrier()
    return tag


def find_latest(ckpt_dir: str) -> tuple[str, dict] | None:
    """(tag, run_state) of the newest complete checkpoint, or None for a fresh run."""
    marker = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        tag = f.read().strip()
    state_path = os.path.join(ckpt_dir, tag, RUN_STATE)
    try:
        with open(state_path) as f:
            return tag, json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} is incomplete or corrupt "
                          f"({e}); remove {marker} to start fresh or point it at an older "
                          f"tag") from None


def check_compatible(run_state: dict, model_cfg: ModelConfig, tp: int, pp: int, where: str):
    saved = run_state.get("model", {})
    mine = asdict(model_cfg)
    diff = [f"model.{k}: checkpoint {saved[k]} vs run {mine[k]}"
            for k in mine if k in saved and saved[k] != mine[k]]
    if run_state.get("tp", tp) != tp or run_state.get("pp", pp) != pp:
        diff.append(f"parallel.tp/pp: checkpoint {run_state.get('tp')}/{run_state.get('pp')} "
                    f"vs run {tp}/{pp}")
    if diff:
        raise ConfigError(f"checkpoint {where} was written by a different model or layout ("
                          + "; ".join(diff) + "); use a new train.out_dir or the same settings")


def load(engine, ckpt_dir: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
