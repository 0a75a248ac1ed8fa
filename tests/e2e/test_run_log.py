"""What a run tells its user (training/run_log.py): the banner, config.resolved.yaml (written
before the first step), step lines with time / elapsed / ETA, train.log (the same lines as
stdout), TensorBoard tags, and the wandb monitor refused when wandb is missing."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess

import deepspeed
import pytest
import torch
import transformers
import yaml

from apollo_ds.training.run_log import LOG, RESOLVED
from tests.conftest import PY, REPO, pretrain, read_metrics, run
from tests.e2e.helpers import PRETRAIN, tiny_config

STEP = re.compile(r"^step\s+\d+/\d+ \|.*\| (\d\d:\d\d:\d\d) \| elapsed (\d+:\d\d:\d\d) \| "
                  r"ETA (\d+:\d\d:\d\d)$", re.M)


@pytest.fixture(scope="module")
def two_steps(corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runlog")
    # DeepSpeed's csv monitor: the same path a wandb monitor takes, without wandb
    ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp / "csv"), "job_name": "run"}
    (tmp / "ds.json").write_text(json.dumps(ds))
    cfg = tiny_config(tmp / "run.yaml", corpus, steps=2, eval_interval=1,
                      deepspeed_config=str(tmp / "ds.json"))
    r = pretrain(1, cfg, f"train.out_dir={tmp / 'run'}")
    return tmp / "run", r


def _single(cfg, out) -> list[str]:
    """One process without a launcher: pretrain.py's own exit code comes back."""
    return [PY, PRETRAIN, "--config", str(cfg), f"train.out_dir={out}"]


def _git_rev() -> str | None:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                       text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def test_resolved_config_and_banner(two_steps, corpus, single_process_group):
    out, r = two_steps
    info = yaml.safe_load((out / RESOLVED).read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["deepspeed"] == deepspeed.__version__
    assert info["versions"]["transformers"] == transformers.__version__
    assert info["versions"]["megatron-core"]
    rev = _git_rev()
    assert (info["git"] or {}).get("rev") == rev
    assert info["config"]["train"]["steps"] == 2 and info["config"]["model"]["layers"] == 2
    assert info["layout"] == {"dp": 1, "tp": 1, "pp": 1, "zero": 1, "dtype": "torch.float32"}
    # the parameter count is the real model's (padded vocabulary included)
    from apollo_ds.config import load_config, validate
    from apollo_ds.model import PoolGPT
    cfg = validate(load_config(str(out.parent / "run.yaml")), check_files=False)
    n = sum(p.numel() for p in PoolGPT(cfg.model, 2).parameters())
    head = r.stdout.split("\nstep ")[0]
    assert f"parameters: {n / 1e6:.3f} M at full depth" in head, head
    assert "layout: dp 1 x tp 1 x pp 1 = 1 ranks | ZeRO 1 | float32" in head
    assert f"{8 * 32:,} tokens per step, {2 * 8 * 32:,} over 2 steps;" in head
    assert "epochs" in head and "expected training FLOPs relative to full depth" in head
    assert f"git {rev[:12]}" in head if rev else "git not a git checkout" in head


def test_step_lines_clock_and_log_file(two_steps):
    out, r = two_steps
    lines = [m.group(0) for m in STEP.finditer(r.stdout)]
    assert len(lines) == 2, r.stdout
    assert all(m.group(3) == "0:00:00" for m in STEP.finditer(lines[-1]))   # last: ETA 0
    log = (out / LOG).read_text()
    assert [m.group(0) for m in STEP.finditer(log)] == lines
    assert log.startswith("==== start ") and "done: step 2/2" in log
    # the trainer's other lines carry the time and elapsed time too
    clock = r" \| \d\d:\d\d:\d\d \| elapsed \d+:\d\d:\d\d$"
    for head in ("saved checkpoint ", "done: step 2/2 "):
        assert re.search(rf"^{head}.*{clock}", r.stdout, re.M), (head, r.stdout)
    assert log.count("==== start ") == 1


def test_tensorboard_tags(two_steps):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _ = two_steps
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/loss", "apollo/depth", "apollo/unique_layers", "by_tokens/loss",
            "by_tokens/eval_loss", "train/loss"} <= tags, tags
    assert "train/eval_loss" not in tags and "train/tokens" not in tags
    recs = [m for m in read_metrics(out) if m.get("kind", "train") == "train"]
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    assert evals == [(m["step"], pytest.approx(m["eval_loss"], rel=1e-6)) for m in recs]
    assert [e.step for e in acc.Scalars("by_tokens/loss")] == [256, 512]
    assert [e.value for e in acc.Scalars("apollo/depth")] == [2.0, 2.0]


def test_config_written_before_the_first_step(corpus, tmp_path):
    """A run that dies in its first step (NaN loss, exit 3) still leaves its record."""
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=2)
    r = run(_single(cfg, tmp_path / "run"), env={"APOLLO_DS_FAULT": "nan_loss@step=1"})
    assert r.returncode == 3, r.stderr[-2000:]
    info = yaml.safe_load((tmp_path / "run" / RESOLVED).read_text())
    assert info["config"]["train"]["steps"] == 2
    log = (tmp_path / "run" / LOG).read_text()
    assert "parameters:" in log and not STEP.search(log)


def test_wandb_enabled_without_wandb_is_refused(corpus, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    ds = json.loads((REPO / "ds_configs" / "zero1_fp32.json").read_text())
    ds["wandb"] = {"enabled": True, "project": "x"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=2,
                      deepspeed_config=str(tmp_path / "ds.json"))
    r = run(_single(cfg, tmp_path / "run"))
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'ds.json'} enables the wandb monitor but wandb is "
                      f"not installed; pip install wandb, or set \"wandb\": {{\"enabled\": "
                      f"false}}"], r.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_deepspeed_monitor_gets_the_run_scalars(two_steps):
    """With a DeepSpeed monitor enabled (csv here, wandb the same way), the run's own scalars
    go to it beside DeepSpeed's: eval/loss per step, equal to metrics.jsonl."""
    out, _ = two_steps
    rows = (out.parent / "csv" / "run" / "eval_loss.csv").read_text().splitlines()
    recs = [m for m in read_metrics(out) if m.get("kind", "train") == "train"]
    got = [(int(a), float(b)) for a, b in (r.split(",") for r in rows[1:])]
    assert got == [(m["step"], pytest.approx(m["eval_loss"], rel=1e-6)) for m in recs]
    assert (out.parent / "csv" / "run" / "apollo_depth.csv").exists()
