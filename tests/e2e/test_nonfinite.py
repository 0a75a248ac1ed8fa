"""train.on_nonfinite end to end (torchrun, 2 processes, the test-only APOLLO_DS_FAULT hook):

- stop: a NaN gradient on ONE rank at step 4 stops both before the optimizer step with exit
  code 3 and one line naming the step, the depths, the samples and the newest checkpoint, which
  stays byte for byte what it was (and still verifies); nothing new is saved;
- skip: dropped steps leave masters, moments and Adam step counts in the checkpoint written
  after them identical to the one before, the run goes on, and more than train.max_skipped in
  a row stops it with exit code 3."""
import hashlib
import json
import math
import os
import re
import subprocess

import torch

from apollo_ds import rundir
from tests.conftest import read_metrics
from tests.e2e.helpers import REPO, launcher_env, tiny_config, torchrun_cmd

EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")
ROOT = re.compile(r"Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-?\d+)", re.S)


def _exited_3(r) -> bool:
    """torchrun's report: the first rank to leave exited 3; torchrun then SIGTERMs any rank
    still tearing down (-15); torchrun itself exits 1."""
    root = ROOT.search(r.stderr)
    return (r.returncode == 1 and root is not None and root.group(1) == "3"
            and set(EXIT.findall(r.stderr)) <= {"3", "-15"})


def _run(cfg, out, *overrides, fault=None):
    full = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                **launcher_env())
    full.pop("APOLLO_DS_FAULT", None)
    if fault:
        full["APOLLO_DS_FAULT"] = fault
    return subprocess.run(torchrun_cmd(cfg, out, *overrides), cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=900)


def _snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tensors(tag_dir) -> dict:
    """Every tensor of a checkpoint's state (each rank's fp32 masters and Adam moments, one
    entry per fragment and key) and the optimizer step, read through the index's offsets."""
    params = tag_dir / rundir.PARAMS
    index = json.loads((params / rundir.INDEX).read_text())
    out = {"optimizer_step": torch.tensor(index["optimizer_step"])}
    for name, rows in index["fragments"].items():
        for file, pp, _tp, tp_rank, _shape, start, count, offset in rows:
            raw = (params / file).read_bytes()[offset: offset + 12 * count]
            for j, key in enumerate(("param", "exp_avg", "exp_avg_sq")):
                out[f"{file}/{name}/{start}/{key}"] = torch.frombuffer(
                    bytearray(raw[4 * j * count: 4 * (j + 1) * count]), dtype=torch.float32)
    return out


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and len(a) > 10
    return all(torch.equal(a[k], b[k]) for k in a)


def test_stop_exits_3_and_leaves_the_last_checkpoint_untouched(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=6, save_interval=2,
                      deepspeed_config="ds_configs/zero0_fp32.json")
    r = _run(cfg, out, "train.stop_after=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = out / rundir.CHECKPOINTS
    before = _snapshot(ckpt)
    assert "step_0000002/manifest.json" in before
    # fp32 ZeRO 0: DeepSpeed has no check of its own; without ours the NaN would be applied
    r = _run(cfg, out, fault="nan_grad@step=4@rank=1")
    assert _exited_3(r), r.stderr[-4000:]
    # depths: full depth 2 for each of the 8 / (2 x 2) = 2 micro-batches; step 4 covers
    # samples 3 x 8 .. 4 x 8 - 1
    want = (f"error: non-finite gradient norm nan at step 4 (depths [2, 2], samples 24..31); "
            f"stopped before its optimizer step and saved nothing: the newest checkpoint "
            f"{ckpt / 'step_0000002'} is the last good state, untouched (rerun resumes from "
            f"it); lower train.lr, check those samples, or set train.on_nonfinite=skip / "
            f"raise train.max_skipped")
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [want]
    assert _snapshot(ckpt) == before       # byte for byte, no new tag, `latest` unchanged
    assert [rec["step"] for rec in read_metrics(out)] == [1, 2, 3]
    from apollo_ds.training import checkpoint
    assert checkpoint.verify(str(ckpt / "step_0000002")) is None


def test_skip_drops_steps_and_max_skipped_stops(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=10, save_interval=1,
                      on_nonfinite="skip", max_skipped=2)
    # the loss reads NaN with finite gradients (DeepSpeed alone would step): 3, then 5 6 7
    r = _run(cfg, out, fault="nan_loss@step=3@rank=0,nan_loss@step=5-9@rank=1")
    assert _exited_3(r), r.stderr[-4000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(
        "error: 3 non-finite steps in a row, the last (loss nan) at step 7 (depths [2, 2], "
        "samples 48..55), more than train.max_skipped=2; stopped before its optimizer step and "
        f"saved nothing: the newest checkpoint {out / 'checkpoints' / 'step_0000006'} is the "
        "last good state"), err
    recs = read_metrics(out)
    assert [rec["step"] for rec in recs] == [1, 2, 3, 4, 5, 6]
    assert [rec.get("skipped", False) for rec in recs] == [False, False, True, False, True, True]
    assert [rec.get("skipped_steps", 0) for rec in recs] == [0, 0, 1, 1, 2, 3]
    assert all(rec["loss"] is None for rec in recs if rec.get("skipped"))
    assert all(0 < rec["loss"] < math.log(corpus.vocab) + 1 for rec in recs
               if not rec.get("skipped"))
    t = {s: _tensors(out / rundir.CHECKPOINTS / rundir.tag_for(s)) for s in range(2, 7)}
    assert _same(t[2], t[3])                   # the skipped step 3 changed nothing
    assert not _same(t[3], t[4])               # step 4 trained
    assert _same(t[4], t[5]) and _same(t[5], t[6])
    assert not (out / rundir.CHECKPOINTS / "step_0000007").exists()
