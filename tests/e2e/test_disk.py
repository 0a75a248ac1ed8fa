"""Disk: a run refuses to start when out_dir cannot hold one checkpoint (exit 2, one line); a
save with no room, or one whose write fails (an injected ENOSPC on one rank), stops the run with
exit 6 and one line saying what failed and where, no traceback, and leaves every earlier
checkpoint and `latest` intact, so the same command resumes from it. Small file systems are
real tmpfs mounts (root only; CI runs as root)."""
import os
import subprocess

import pytest

from apollo_ds import rundir
from tests.conftest import PY, REPO, read_metrics
from tests.e2e.helpers import tiny_config, torchrun_cmd


def _env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                **extra)


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, size: str):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            if os.environ.get("CI"):
                pytest.fail(f"cannot mount a tmpfs: {r.stderr}")
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        mounted.append(d)
        return d
    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _errors(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("error") or "] error:" in ln]


def _no_traceback_of_ours(text: str) -> None:
    frames = [ln for ln in text.splitlines() if ln.lstrip().startswith("File ")]
    assert not any("apollo_ds/" in f for f in frames), text[-3000:]


def test_refused_when_out_dir_cannot_hold_a_checkpoint(corpus, tmp_path, tmpfs):
    small = tmpfs("small", "1m")
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=4)
    r = subprocess.run([PY, "apollo_ds/pretrain.py", "--config", str(cfg),
                        f"train.out_dir={small}/run"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    errs = _errors(r.stderr)
    assert r.returncode == 2 and len(errs) == 1, r.stderr[-3000:]
    assert f"train.out_dir={small}/run has 1.0 MiB free" in errs[0]
    assert "one checkpoint of this model needs about" in errs[0]
    assert "choose another train.out_dir" in errs[0]
    assert os.listdir(small) == []


def test_no_room_for_the_next_save_keeps_the_earlier_one(corpus, tmp_path, tmpfs):
    # room for the first checkpoint (the estimate is ~5% above the real size), not a second
    from apollo_ds.config import load_config
    from apollo_ds.value_checks import checkpoint_bytes
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=6, save_interval=2)
    one = checkpoint_bytes(load_config(str(cfg)), bf16=False)
    disk = tmpfs("disk", f"{int(1.7 * one) // 1024}k")
    out = disk / "run"
    r = subprocess.run(torchrun_cmd(cfg, out), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    text = r.stdout + r.stderr
    errs = [e for e in _errors(text) if "not enough room" in e]
    assert r.returncode != 0 and len(errs) == 1, text[-3000:]
    assert "not enough room for the checkpoint of step 4" in errs[0]
    assert "nothing was written and the earlier checkpoints and latest (step_0000002) are " \
           "intact" in errs[0]
    assert "Exit code: 6" in text or "exitcode  : 6" in text or "exitcode: 6" in text, text[-2000:]
    _no_traceback_of_ours(text)
    ckpt = out / rundir.CHECKPOINTS
    assert rundir.read_latest(str(ckpt)) == "step_0000002"
    assert rundir.manifest_problem(str(ckpt / "step_0000002")) is None
    assert not (ckpt / "step_0000004").exists()


def test_a_write_failing_on_one_rank_stops_every_rank_cleanly(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=6, save_interval=2)
    r = subprocess.run(torchrun_cmd(cfg, out), cwd=REPO, timeout=600, capture_output=True,
                       text=True, env=_env(APOLLO_DS_FAULT="enospc_save@step=4@rank=1"))
    text = r.stdout + r.stderr
    errs = [e for e in _errors(text) if "saving the checkpoint" in e]
    assert r.returncode != 0 and len(errs) == 1, text[-3000:]
    assert "rank 1: saving the checkpoint of step 4 failed: No space left on device" in errs[0]
    assert "latest (step_0000002) are intact" in errs[0]
    _no_traceback_of_ours(text)
    ckpt = out / rundir.CHECKPOINTS
    assert rundir.read_latest(str(ckpt)) == "step_0000002"
    assert not rundir.has_manifest(str(ckpt / "step_0000004"))
    # the same command resumes from the intact checkpoint and finishes every step once
    r = subprocess.run(torchrun_cmd(cfg, out), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert [rec["step"] for rec in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
