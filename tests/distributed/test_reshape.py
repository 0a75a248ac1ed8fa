"""Resume under another layout: a checkpoint written mid-Apollo (pool of 2 of 4 layers, Adam
state after 6 steps) at one (DP, TP, PP, ZeRO) layout resumes at another and reproduces the
uninterrupted run's losses (rel 1e-5) through the next expansion to the end. The DP-wide
micro-batch (micro_batch x dp) is kept, so the depth plan and the samples of every micro-step
are the same; where it changes, the run continues and says so once."""
import json
import math
import shutil

import pytest

from apollo_ds import param_store, rundir
from tests.conftest import pretrain, read_metrics, write_config

APOLLO = {"enabled": True, "stages": [1, 2, 4], "stage_ends": [4, 8]}   # expands after 4, 8
STEPS, SAVE_AT = 12, 6

# name -> (processes, tp, pp, micro_batch, deepspeed config); DP = processes / (tp x pp)
LAYOUTS = {
    "dp2_z1": (2, 1, 1, 2, "zero1_fp32"),
    "dp1_z0": (1, 1, 1, 4, "zero0_fp32"),
    "dp2_z3": (2, 1, 1, 2, "zero3_fp32"),
    "tp2_z2": (2, 2, 1, 4, "zero2_fp32"),
    "tp2_z1": (2, 2, 1, 4, "zero1_fp32"),
    "pp2_z1": (2, 1, 2, 4, "zero1_fp32"),
    "dp1_z1": (1, 1, 1, 4, "zero1_fp32"),
}


def run(tmp_path, corpus, layout, out, model=None, **train):
    nproc, tp, pp, micro, ds = LAYOUTS[layout]
    cfg = write_config(tmp_path / f"{out}.yaml", corpus, apollo=APOLLO,
                       model=model or {},
                       parallel={"tp": tp, "pp": pp},
                       train={"steps": STEPS, "micro_batch": micro, "save_interval": SAVE_AT,
                              "out_dir": str(tmp_path / out),
                              "deepspeed_config": f"ds_configs/{ds}.json", **train})
    return pretrain(nproc, cfg)


def from_checkpoint(tmp_path, src: str, dst: str) -> None:
    """A run directory holding only ``src``'s checkpoint at SAVE_AT (as if it had stopped
    there), its metrics up to that step."""
    tag = rundir.tag_for(SAVE_AT)
    ck = tmp_path / dst / rundir.CHECKPOINTS
    shutil.copytree(tmp_path / src / rundir.CHECKPOINTS / tag, ck / tag)
    (ck / rundir.LATEST).write_text(tag)
    recs = [r for r in read_metrics(tmp_path / src) if r["step"] <= SAVE_AT]
    (tmp_path / dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize("a,b", [("dp2_z1", "dp1_z0"), ("tp2_z2", "dp2_z3"),
                                 ("pp2_z1", "tp2_z1"), ("dp1_z1", "pp2_z1")])
def test_resume_under_another_layout_matches_uninterrupted(a, b, corpus, tmp_path):
    run(tmp_path, corpus, a, "straight")
    reference = read_metrics(tmp_path / "straight")
    assert [r["n_unique"] for r in reference] == [1] * 4 + [2] * 4 + [4] * 4
    from_checkpoint(tmp_path, "straight", "moved")
    r = run(tmp_path, corpus, b, "moved")
    assert r.stdout.count("resuming under another layout") == 1, r.stdout
    assert f"at step {SAVE_AT} with 2 unique layers" in r.stdout
    assert "data-parallel-wide micro-batch" not in r.stdout
    moved = read_metrics(tmp_path / "moved")
    assert [x["step"] for x in moved] == list(range(1, STEPS + 1))   # every step once
    assert [x["layer_maps"] for x in moved] == [x["layer_maps"] for x in reference]
    for x, y in zip(moved[SAVE_AT:], reference[SAVE_AT:]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (x["step"], a, b)
    assert moved[-1]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=1e-5)
    assert moved[-1]["cum_flops"] == pytest.approx(reference[-1]["cum_flops"], rel=1e-12)


@pytest.mark.parametrize("a,b", [("dp2_z1", "dp1_z0"), ("tp2_z1", "dp1_z1")])
def test_reshaped_resume_with_dropout_runs_to_the_end(a, b, corpus, tmp_path):
    """The priming step of a reshaped resume is a training forward with dropout on: it needs
    the model-parallel RNG tracker seeded before the first step (it used to fail with "cuda
    rng state model-parallel-rng is not added"). Dropout masks depend on the DP rank, so the
    losses after the move are the new layout's own: finite, every step once."""
    run(tmp_path, corpus, a, "straight", model={"dropout": 0.1})
    from_checkpoint(tmp_path, "straight", "moved")
    r = run(tmp_path, corpus, b, "moved", model={"dropout": 0.1})
    assert r.stdout.count("resuming under another layout") == 1, r.stdout
    moved = read_metrics(tmp_path / "moved")
    assert [x["step"] for x in moved] == list(range(1, STEPS + 1))   # every step once
    assert [x["n_unique"] for x in moved] == [1] * 4 + [2] * 4 + [4] * 4
    assert all(math.isfinite(x["loss"]) for x in moved) and math.isfinite(moved[-1]["eval_loss"])


def test_another_dp_wide_micro_batch_continues_and_says_so(corpus, tmp_path):
    run(tmp_path, corpus, "dp2_z1", "straight")
    from_checkpoint(tmp_path, "straight", "moved")
    # DP=1 with micro_batch 2: micro-steps of 2 samples instead of 4
    r = run(tmp_path, corpus, "dp1_z0", "moved", micro_batch=2)
    assert r.stdout.count("data-parallel-wide micro-batch changed (4 -> 2 samples)") == 1
    moved = read_metrics(tmp_path / "moved")
    assert [x["step"] for x in moved] == list(range(1, STEPS + 1))
    assert all(len(x["layer_maps"]) == 4 for x in moved[SAVE_AT:])
    assert moved[-1]["loss"] < moved[0]["loss"] - 0.3


def test_checkpoint_without_layout_free_state_is_refused_under_another_layout(corpus,
                                                                              tmp_path):
    run(tmp_path, corpus, "dp1_z1", "straight", stop_after=SAVE_AT)
    tag_dir = tmp_path / "straight" / rundir.CHECKPOINTS / rundir.tag_for(SAVE_AT)
    # strict loading first: a parameter cut to half its rows the same way in index.json's
    # shape and its stored slices' shape (consistent, manifest re-recorded, so only the
    # model's own shape can notice) is refused naming the parameter, the index and both
    # shapes, never zero-padded (it used to end in a traceback in state.write_entry)
    from_checkpoint(tmp_path, "straight", "cut")
    cut_dir = tmp_path / "cut" / rundir.CHECKPOINTS / rundir.tag_for(SAVE_AT)
    path = cut_dir / rundir.PARAMS / rundir.INDEX
    index = json.loads(path.read_text())
    name = "pool.0.fc1.weight"
    rows, cols = index["params"][name]["shape"]
    index["params"][name]["shape"] = [rows // 2, cols]
    for row in index["fragments"][name]:
        row[4] = [rows // 2, cols]
    path.write_text(json.dumps(index))
    manifest = json.loads((cut_dir / rundir.MANIFEST).read_text())
    manifest["files"][f"{rundir.PARAMS}/{rundir.INDEX}"] = {"size": path.stat().st_size,
                                                             "sha256": rundir.sha256(str(path))}
    (cut_dir / rundir.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AssertionError) as e:
        run(tmp_path, corpus, "tp2_z1", "cut")
    assert (f"error: parameter {name}: {path} records shape [{rows // 2}, {cols}] "
            f"(tensor-parallel dim 0) but the model's is [{rows}, {cols}] (dim 0); the "
            f"checkpoint was written by another model\n") in str(e.value)
    assert "exitcode  : 2" in str(e.value)
    shutil.rmtree(tag_dir / rundir.PARAMS)
    manifest = json.loads((tag_dir / rundir.MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items()
                         if not k.startswith("params/")}
    (tag_dir / rundir.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(AssertionError) as e:
        run(tmp_path, corpus, "tp2_z1", "straight")
    assert "has no layout-free state (params/)" in str(e.value)
    assert "exitcode  : 2" in str(e.value)      # pretrain.py's exit code for refused input


def test_resume_reads_only_the_byte_ranges_each_rank_owns(corpus, tmp_path, monkeypatch):
    """APOLLO_LOAD_PROFILE: each rank appends the bytes it read per file. Under the same layout
    (DP2 ZeRO-3) a rank reads exactly its own file, whole; under another (DP2 ZeRO-1: flat
    partitions of each parameter group instead of per-parameter ones) it reads 12 bytes per
    element it owns and nothing else: the ranks together read every stored byte once, each
    about half."""
    run(tmp_path, corpus, "dp2_z3", "src", stop_after=SAVE_AT)
    params = tmp_path / "src" / rundir.CHECKPOINTS / rundir.tag_for(SAVE_AT) / rundir.PARAMS
    sizes = {p.name: p.stat().st_size for p in params.glob("rank_*.bin")}
    assert sorted(sizes) == [param_store.rank_file(0), param_store.rank_file(1)]
    total = sum(sizes.values())
    for layout in ("dp2_z3", "dp2_z1"):
        prof = tmp_path / f"{layout}.jsonl"
        monkeypatch.setenv("APOLLO_LOAD_PROFILE", str(prof))
        from_checkpoint(tmp_path, "src", layout)
        run(tmp_path, corpus, layout, layout, stop_after=SAVE_AT + 1)
        recs = {r["rank"]: r for r in map(json.loads, prof.read_text().splitlines())}
        assert sorted(recs) == [0, 1]
        if layout == "dp2_z3":
            assert {r: x["read"] for r, x in recs.items()} == {
                r: {param_store.rank_file(r): sizes[param_store.rank_file(r)]} for r in (0, 1)}
            continue
        for x in recs.values():
            assert sum(x["read"].values()) == 12 * x["owned"] <= 0.55 * total, x
        assert sum(12 * x["owned"] for x in recs.values()) == total


def test_tensor_parallel_reslice_reads_each_ranks_slice_only(corpus, tmp_path, monkeypatch):
    """TP1 -> TP2: each rank reads 12 bytes per element of its own TP slice (row-parallel
    weights as one row piece per row) plus the replicated tensors it holds whole, never the
    other rank's slice."""
    run(tmp_path, corpus, "dp1_z1", "src", stop_after=SAVE_AT)
    params = tmp_path / "src" / rundir.CHECKPOINTS / rundir.tag_for(SAVE_AT) / rundir.PARAMS
    total = (params / param_store.rank_file(0)).stat().st_size
    prof = tmp_path / "tp2.jsonl"
    monkeypatch.setenv("APOLLO_LOAD_PROFILE", str(prof))
    from_checkpoint(tmp_path, "src", "tp2")
    run(tmp_path, corpus, "tp2_z1", "tp2", stop_after=SAVE_AT + 1)
    recs = [json.loads(line) for line in prof.read_text().splitlines()]
    assert sorted(x["rank"] for x in recs) == [0, 1]
    for x in recs:
        assert sum(x["read"].values()) == 12 * x["owned"] <= 0.75 * total, (x, total)
    # together: everything once, the replicated tensors twice
    assert total < sum(12 * x["owned"] for x in recs) < 1.5 * total
