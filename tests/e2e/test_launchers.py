"""The same tiny pretraining job (2 ranks, gloo, ZeRO-1) launched the three ways users launch it:
the DeepSpeed launcher (as `make demo` does; it passes --local_rank), `mpirun` (the pip mpich
runtime; DeepSpeed finds the ranks through mpi4py) and torchrun. All three must log the same
per-step losses. Rerunning a finished command resumes and does nothing more; a bad config is
refused with exit code 2 before any work."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pytest

from apollo_ds import rundir
from tests.conftest import PY, read_metrics
from tests.e2e.helpers import (PRETRAIN, assert_same_losses, check_ok, deepspeed_cmd, launch,
                               mpirun_cmd, run_state, tiny_config, torchrun_cmd, train_losses)

STEPS = 4
STEP_LINE = re.compile(r"^step\s+\d+/\d+ \|", re.M)


@pytest.fixture(scope="module")
def tiny(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("launchers")
    return d, tiny_config(d / "run.yaml", corpus, steps=STEPS)


def _launched(tiny, name, make_cmd):
    d, cfg = tiny
    out = d / name
    cmd = make_cmd(cfg, out)
    t0 = time.perf_counter()
    r = check_ok(launch(cmd), name)
    print(f"{name}: {time.perf_counter() - t0:.1f}s")
    return {"out": out, "cmd": cmd, "result": r}


@pytest.fixture(scope="module")
def torchrun_run(tiny):
    return _launched(tiny, "torchrun", torchrun_cmd)


@pytest.fixture(scope="module")
def deepspeed_run(tiny):
    return _launched(tiny, "deepspeed", deepspeed_cmd)


@pytest.fixture(scope="module")
def mpirun_run(tiny):
    return _launched(tiny, "mpirun", mpirun_cmd)


def _check_two_rank_run(run):
    losses = train_losses(run["out"])
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), losses
    assert all(math.isfinite(v) for _, v in losses), losses
    state = run_state(run["out"])
    # two data-parallel ranks really took part (not two 1-rank singletons)
    assert (state["step"], state["dp"], state["tp"]) == (STEPS, 2, 1), state
    tag = Path(run["out"]) / rundir.CHECKPOINTS / rundir.tag_for(STEPS)
    for r in range(2):
        assert (tag / rundir.PARAMS / f"rank_{r:05d}.bin").exists()
    assert f"done: step {STEPS}/{STEPS}" in run["result"].stdout
    return losses


def test_torchrun(torchrun_run):
    losses = _check_two_rank_run(torchrun_run)
    assert losses[-1][1] < losses[0][1], f"loss did not go down: {losses}"


def test_deepspeed_launcher_matches_torchrun(deepspeed_run, torchrun_run):
    out = deepspeed_run["result"].stdout
    assert "--local_rank=0" in out and "--local_rank=1" in out   # the launcher passed it
    got = _check_two_rank_run(deepspeed_run)
    worst = assert_same_losses(got, train_losses(torchrun_run["out"]), "deepspeed vs torchrun")
    print(f"deepspeed vs torchrun: {got} max |diff| {worst:.3g}")


def test_mpirun_matches_torchrun(mpirun_run, torchrun_run):
    got = _check_two_rank_run(mpirun_run)
    worst = assert_same_losses(got, train_losses(torchrun_run["out"]), "mpirun vs torchrun")
    print(f"mpirun vs torchrun: {got} max |diff| {worst:.3g}")


def test_rerun_after_finish_resumes_and_does_nothing(deepspeed_run):
    out = Path(deepspeed_run["out"])
    metrics_before = (out / "metrics.jsonl").read_bytes()
    tags_before = sorted(p.name for p in (out / rundir.CHECKPOINTS).iterdir())
    r = check_ok(launch(deepspeed_run["cmd"]), "rerun of the deepspeed command")
    assert re.search(rf"resumed from \S+step_{STEPS:07d} at step {STEPS}\b", r.stdout), r.stdout
    assert not STEP_LINE.search(r.stdout), f"the rerun trained again:\n{r.stdout}"
    assert f"nothing to do: already at step {STEPS}/{STEPS}" in r.stdout
    # every step still logged exactly once, and nothing rewritten
    assert [rec["step"] for rec in read_metrics(out)] == list(range(1, STEPS + 1))
    assert (out / "metrics.jsonl").read_bytes() == metrics_before
    assert sorted(p.name for p in (out / rundir.CHECKPOINTS).iterdir()) == tags_before


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("launcher", ["python", "deepspeed", "mpirun"])
def test_bad_config_exits_2_before_any_work(launcher, tiny):
    d, cfg = tiny
    out = d / f"bad_{launcher}"
    bad = ("model.heads=3",)                      # does not divide model.hidden=64
    if launcher == "python":
        cmd = [PY, PRETRAIN, "--config", str(cfg), f"train.out_dir={out}", *bad]
    else:
        cmd = {"deepspeed": deepspeed_cmd, "mpirun": mpirun_cmd}[launcher](cfg, out, *bad)
    t0 = time.perf_counter()
    r = launch(cmd, timeout=300)
    secs = time.perf_counter() - t0
    assert r.returncode == 2, f"rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    errors = _error_lines(r.stderr)
    assert errors and all("model.heads" in e for e in errors), r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not STEP_LINE.search(r.stdout)
    assert not out.exists(), "a refused run must not create its out_dir"
    if launcher == "python":
        # one process: exactly one line, and nothing else on stderr
        assert r.stderr.strip().splitlines() == errors and len(errors) == 1, r.stderr
    else:
        # every rank validates before the process group exists; only rank 0 speaks
        assert len(errors) == 1, errors
    print(f"bad config via {launcher}: rc 2 in {secs:.1f}s: {errors[0]}")
