"""Real pretraining runs over 2 gloo processes (torchrun): every ZeRO stage trains, resume is
exact (also across an Apollo expansion), DP=2 matches DP=1, and all ranks agree on the plan."""
import json

import pytest

from apollo_ds import rundir
from tests.conftest import pretrain, read_metrics, write_config

APOLLO = {"enabled": True, "stages": [1, 2, 4], "stage_ends": [9, 14]}   # expands after 9, 14


def losses(out):
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))  # every step once
    return [r["loss"] for r in recs]


def config(tmp_path, corpus, name, zero, dtype="fp32", mode="copy", **train):
    return write_config(tmp_path / f"{name}.yaml", corpus,
                        apollo={**APOLLO, "optimizer_state": mode},
                        train={"steps": 20, "out_dir": str(tmp_path / name),
                               "deepspeed_config": f"ds_configs/zero{zero}_{dtype}.json",
                               **train})


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """get(zero, mode): the per-step losses of the uninterrupted fp32 run of that layout, run
    once for the module (the resume and fallback tests both compare with ZeRO-1 copy's)."""
    runs = {}

    def get(zero, mode="copy"):
        if (zero, mode) not in runs:
            d = tmp_path_factory.mktemp(f"straight_z{zero}_{mode}")
            pretrain(2, config(d, corpus, "straight", zero, mode=mode))
            runs[zero, mode] = losses(d / "straight")
        return runs[zero, mode]
    return get


@pytest.mark.parametrize("zero", [0, 3])
def test_zero_stage_trains_with_apollo(zero, corpus, tmp_path):
    cfg = config(tmp_path, corpus, "run", zero)
    pretrain(2, cfg)
    recs = read_metrics(tmp_path / "run")
    assert [r["n_unique"] for r in recs] == [1] * 9 + [2] * 5 + [4] * 6
    assert sum(r["loss"] for r in recs[-3:]) < sum(r["loss"] for r in recs[:3]) - 0.3
    for r in recs:
        assert len(r["layer_maps"]) == 2 and r["flops"] <= r["full_depth_flops"]
        assert all(min(m) == 0 and max(m) == r["n_unique"] - 1 for m in r["layer_maps"])
    assert "eval_loss" in recs[-1]


# reset: the expansion 1 -> 2 after step 9 gives layer 1 a fresh Adam (offset 9, its own
# param groups); resuming at 12 must rebuild those groups and their step counts
@pytest.mark.parametrize("zero,stops,mode", [(1, [9, 10], "copy"), (2, [10], "copy"),
                                             (1, [12], "reset")])
def test_resume_is_exact_across_expansion(zero, stops, mode, corpus, tmp_path, straight):
    reference = straight(zero, mode)
    assert len(reference) == 20
    for k in stops:
        name = f"stop{k}"
        cfg = config(tmp_path, corpus, name, zero, mode=mode, stop_after=k)
        pretrain(2, cfg)
        assert len(losses(tmp_path / name)) == k
        state = json.loads((tmp_path / name / rundir.CHECKPOINTS / rundir.tag_for(k) /
                            rundir.RUN_STATE).read_text())
        assert state["n_unique"] == (1 if k <= 9 else 2)
        assert state["adam_step_offsets"] == ([0] if k <= 9 else [0, 9 if mode == "reset" else 0])
        # the same command without the stop resumes from the checkpoint at step k
        cfg = config(tmp_path, corpus, name, zero, mode=mode)
        r = pretrain(2, cfg)
        assert "resumed from" in r.stdout and f"at step {k}" in r.stdout
        assert losses(tmp_path / name) == reference, name   # bit-identical


def test_dp2_matches_dp1_with_apollo(corpus, tmp_path):
    # The plan's micro-batch is data-parallel-wide: DP=1 with micro_batch 4 sees the same
    # samples and depths per micro-step as DP=2 with micro_batch 2.
    one = config(tmp_path, corpus, "dp1", 1, micro_batch=4)
    two = config(tmp_path, corpus, "dp2", 1, micro_batch=2, check_plan_agreement=True)
    pretrain(1, one)
    pretrain(2, two)
    a, b = read_metrics(tmp_path / "dp1"), read_metrics(tmp_path / "dp2")
    assert [r["layer_maps"] for r in a] == [r["layer_maps"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], rel=1e-5)
    # plan agreement: the maps recorded by each rank are identical
    p0 = (tmp_path / "dp2" / "plans" / "rank0.jsonl").read_text()
    p1 = (tmp_path / "dp2" / "plans" / "rank1.jsonl").read_text()
    assert p0 == p1 and len(p0.splitlines()) == 20


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_bf16_trains_expands_and_resumes_exactly(zero, corpus, tmp_path):
    """bf16 (fp32 masters, fp32 gradient accumulation and reduction) at ZeRO 1/2/3: the run
    learns across both expansions, and stop at step 10 (just after the first expansion) +
    resume reproduces the straight run bit for bit."""
    pretrain(2, config(tmp_path, corpus, "straight", zero, "bf16"))
    recs = read_metrics(tmp_path / "straight")
    assert [r["n_unique"] for r in recs] == [1] * 9 + [2] * 5 + [4] * 6
    assert sum(r["loss"] for r in recs[-3:]) < sum(r["loss"] for r in recs[:3]) - 0.3
    reference = losses(tmp_path / "straight")
    pretrain(2, config(tmp_path, corpus, "resumed", zero, "bf16", stop_after=10))
    r = pretrain(2, config(tmp_path, corpus, "resumed", zero, "bf16"))
    assert "at step 10" in r.stdout
    assert losses(tmp_path / "resumed") == reference


def test_corrupt_newest_checkpoint_falls_back_and_resumes_exactly(corpus, tmp_path, straight):
    """keep_checkpoints=2 leaves steps 10 and 15 of a run stopped at 15; truncating a file of
    step 15 makes the rerun warn, resume from step 10 (across the expansion after step 9) and
    still end with the straight run's losses, every step once in metrics.jsonl."""
    reference = straight(1)
    pretrain(2, config(tmp_path, corpus, "run", 1, save_interval=5, keep_checkpoints=2,
                       stop_after=15))
    ckpts = tmp_path / "run" / rundir.CHECKPOINTS
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == [
        "step_0000010", "step_0000015"]
    victim = max((p for p in (ckpts / "step_0000015" / rundir.PARAMS).glob("rank_*.bin")),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    r = pretrain(2, config(tmp_path, corpus, "run", 1, save_interval=5, keep_checkpoints=2))
    assert "step_0000015 is corrupt or truncated" in r.stderr
    assert "at step 10" in r.stdout
    assert losses(tmp_path / "run") == reference
