"""One writer per run directory, with real processes: while a 2-process torchrun run trains
(paused inside a checkpoint save by the test-only fault hook, the most fragile moment), a second
run started on the same train.out_dir with another learning rate is refused at once: exit 2,
one line naming the holder (rank 0's pid, its host, its start time) and the fix. The first run
is unaffected: it finishes, every step appears once in metrics.jsonl, its checkpoints verify,
and the lock is free again when it has exited."""
import json
import os
import socket
import subprocess
import sys
import time

from apollo_ds import rundir
from tests.conftest import read_metrics
from tests.e2e.helpers import PRETRAIN, REPO, tiny_config, torchrun_cmd


def _env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def test_second_run_on_a_live_run_dir_is_refused_naming_the_holder(tmp_path, corpus):
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=4, save_interval=2)
    out = tmp_path / "run"
    first = subprocess.Popen(torchrun_cmd(cfg, out), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=_env(APOLLO_DS_FAULT="sleep_save@s=6"))
    try:
        seen = []
        for line in first.stdout:          # wait until the first run is inside a save
            seen.append(line)
            if "fault: sleep_save" in line:
                break
        else:
            raise AssertionError("the first run never reached a save:\n" + "".join(seen[-40:]))
        holder = (out / rundir.LOCK).read_text().strip()
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, PRETRAIN, "--config", str(cfg),
                                 f"train.out_dir={out}", "train.lr=0.01"], cwd=REPO,
                                env=_env(), capture_output=True, text=True, timeout=300)
        refused_in = time.monotonic() - t0
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        rest, _ = first.communicate(timeout=600)
    log = "".join(seen) + rest
    assert first.returncode == 0, log[-4000:]
    pid = int(holder.split()[1])
    assert holder.startswith(f"pid {pid} on {socket.gethostname()}, started ")
    assert second.returncode == 2, second.stderr[-3000:]
    assert second.stderr == (f"error: train.out_dir={out} is in use by another run ({holder}; "
                             f"lock {out / rundir.LOCK}); wait for it to end or choose another "
                             f"train.out_dir\n"), second.stderr
    print(f"second run refused in {refused_in:.1f}s (holder: {holder})")
    # the first run is unaffected: each step once, its own lr, every checkpoint complete
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    lrs = {r["lr"] for r in read_metrics(out) if "lr" in r}
    assert 0.01 not in lrs
    ck = out / rundir.CHECKPOINTS
    assert rundir.complete_tags(str(ck)) == ["step_0000004", "step_0000002"]
    assert rundir.read_latest(str(ck)) == "step_0000004"
    for tag in ("step_0000002", "step_0000004"):
        assert rundir.manifest_problem(str(ck / tag)) is None
    assert json.loads((ck / "step_0000004" / rundir.RUN_STATE).read_text())["step"] == 4
    # the holder has exited: the lock is free
    rundir.RunLock(str(out)).acquire().release()
