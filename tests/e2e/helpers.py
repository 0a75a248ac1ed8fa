"""Shared pieces of the end-to-end launcher tests: the tiny run, launcher command lines, and
reading what a run left behind."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from apollo_ds import rundir
from tests.conftest import REPO, Corpus, free_port, read_metrics, run, write_config

# The venv's bin (not resolved: its python is a symlink to the base interpreter).
VENV_BIN = Path(sys.executable).parent
PRETRAIN = "apollo_ds/pretrain.py"

# 2 layers, hidden 64, 2 heads, seq 32: ~80 k parameters without the embedding, 0.1 s a step.
TINY_MODEL = {"layers": 2, "hidden": 64, "heads": 2, "seq_len": 32}


def tiny_config(path: Path, corpus: Corpus, steps: int = 4, **train) -> Path:
    return write_config(path, corpus, model=TINY_MODEL,
                        train={"steps": steps, "micro_batch": 2, "global_batch": 8,
                               "eval_iters": 2, "log_interval": 1, **train})


def launcher_env() -> dict:
    """deepspeed / mpirun / torchrun are console scripts in the venv: put it first on PATH.
    MASTER_PORT: torchrun and the DeepSpeed launcher replace it with their --master_port; under
    mpirun it is the rendezvous port once apollo_ds.distributed passes it to DeepSpeed's MPI
    discovery (which otherwise uses a fixed 29500)."""
    return {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "MASTER_PORT": str(free_port())}


def venv_tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        msg = f"{path} is missing: install the project with `pip install -e '.[mpi,test]'`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return str(path)


def torchrun_cmd(config: Path, out_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [venv_tool("torchrun"), "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), PRETRAIN, "--config", str(config), f"train.out_dir={out_dir}",
            *overrides]


def deepspeed_cmd(config: Path, out_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [venv_tool("deepspeed"), "--num_gpus", str(nproc), "--master_port",
            str(free_port()), PRETRAIN, "--config", str(config), f"train.out_dir={out_dir}",
            *overrides]


def mpirun_cmd(config: Path, out_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [venv_tool("mpirun"), "-np", str(nproc), str(VENV_BIN / "python"), PRETRAIN,
            "--config", str(config), f"train.out_dir={out_dir}", *overrides]


def launch(cmd: list[str], timeout: int = 600):
    r = run(cmd, env=launcher_env(), timeout=timeout)
    return r


def check_ok(r, what: str):
    assert r.returncode == 0, (f"{what} failed (rc {r.returncode}): {' '.join(r.args)}\n"
                               f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r


def train_losses(out_dir) -> list[tuple[int, float]]:
    """(step, training loss) of every optimizer-step record in metrics.jsonl, in file order."""
    return [(rec["step"], rec["loss"]) for rec in read_metrics(out_dir)
            if "loss" in rec and rec.get("kind", "train") == "train"]


def run_state(out_dir) -> dict:
    ckpt = Path(out_dir) / rundir.CHECKPOINTS
    tag = (ckpt / rundir.LATEST).read_text().strip()
    return json.loads((ckpt / tag / rundir.RUN_STATE).read_text())


def assert_same_losses(got, want, what: str, tol: float = 1e-6):
    assert [s for s, _ in got] == [s for s, _ in want], f"{what}: steps {got} vs {want}"
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got, want))
    assert worst <= tol, f"{what}: losses differ by up to {worst:.3g}:\n{got}\nvs\n{want}"
    return worst


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


__all__ = ["REPO", "VENV_BIN", "TINY_MODEL", "tiny_config", "launcher_env", "venv_tool",
           "torchrun_cmd", "deepspeed_cmd", "mpirun_cmd", "launch", "check_ok", "train_losses",
           "run_state", "assert_same_losses", "have"]
