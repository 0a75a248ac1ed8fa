"""SIGTERM under torchrun, as a scheduler's preemption delivers it (to every task): the run
finishes the current step, writes a checkpoint, exits 0, and the same command resumes and ends
with the uninterrupted run's losses, every step once in metrics.jsonl. A SIGTERM that arrives
during start-up (imports, process groups, engine build) is honoured too: exit 0, no step."""
import json
import os
import re
import signal
import subprocess
import time

import psutil

from apollo_ds import rundir
from tests.conftest import PY, REPO, free_port, read_metrics
from tests.e2e.helpers import tiny_config

STEPS = 60


def _cmd(cfg):
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "apollo_ds/pretrain.py", "--config", str(cfg)]


def _env():
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _workers(proc) -> list:
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "pretrain.py" in " ".join(c.cmdline())]


def _start(cfg):
    return subprocess.Popen(_cmd(cfg), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _losses(out):
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(corpus, tmp_path):
    straight = tiny_config(tmp_path / "straight.yaml", corpus, steps=STEPS,
                           out_dir=str(tmp_path / "straight"))
    r = subprocess.run(_cmd(straight), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reference = _losses(tmp_path / "straight")

    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=STEPS, out_dir=str(out))
    proc = _start(cfg)
    deadline = time.time() + 600
    while time.time() < deadline:   # signal once a few steps are logged
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3:
            break
        time.sleep(0.2)
    for w in _workers(proc):
        w.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    m = re.search(r"stopping after step (\d+) \(signal\)", text)
    assert m, text[-4000:]
    k = int(m.group(1))
    assert 3 <= k < STEPS, "the run finished before the signal arrived; raise STEPS"
    state = json.loads((out / rundir.CHECKPOINTS / rundir.tag_for(k) / rundir.RUN_STATE).read_text())
    assert state["step"] == k
    r = subprocess.run(_cmd(cfg), cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0 and f"at step {k}" in r.stdout, r.stdout[-3000:]
    assert _losses(out) == reference


def test_sigterm_during_startup_exits_zero_without_a_step(corpus, tmp_path):
    out = tmp_path / "early"
    cfg = tiny_config(tmp_path / "early.yaml", corpus, steps=STEPS, out_dir=str(out))
    proc = _start(cfg)
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and len(workers) < 2:
        workers = _workers(proc)
        time.sleep(0.05)
    # both workers exist; give them time to reach pretrain.main (handlers) but not step 1
    time.sleep(2.0)
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out)
    for w in workers:
        w.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-4000:]
    assert "during start-up" in text, text[-3000:]
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out)
