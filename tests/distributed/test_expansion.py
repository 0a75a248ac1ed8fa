"""ZeRO-aware expansion under 2 gloo processes: apollo.md's identity (loss at every depth
d >= N_new unchanged when N_old divides N_new), masters and Adam moments carried to every new
layer from its source (or, per apollo.optimizer_state, reset, rescaled or left as the release
leaves them), per-layer Adam step counts, and training continuing identically on every rank.
Every case runs in one torchrun launch (workers/expansion_check.py builds a Trainer per case)."""
import json

import pytest

from tests.conftest import torchrun, write_config

# Growth 2 -> 4 after step 3: sources [0, 0, 1, 1]. Which old layer's moments each new layer
# holds (None: zero moments, a fresh Adam):
#   copy / copy_scaled: its source's;  reset: the first copy keeps its source's, the second
#   (layers 1, 3) is fresh;  release: layer i < 2 keeps old layer i's OWN moments (the release
#   overwrites only h[i]'s weights), layers 2, 3 were never used and are fresh.
MOMENTS = {"copy": [0, 0, 1, 1], "copy_scaled": [0, 0, 1, 1], "reset": [0, None, 1, None],
           "release": [0, 1, None, None]}


CASES = [(0, "copy", "fp32"), (1, "copy", "fp32"), (2, "copy", "fp32"), (3, "copy", "fp32"),
         (1, "reset", "fp32"), (3, "reset", "fp32"), (2, "release", "fp32"),
         (1, "copy", "bf16"), (2, "copy", "bf16"), (3, "copy", "bf16"),
         (1, "copy", "llama"), (3, "reset", "llama")]
LLAMA = {"arch": "llama", "heads": 4, "kv_heads": 2}


def _config(d, corpus, name, zero, dtype, apollo, model=None):
    return write_config(d / f"{name}.yaml", corpus,
                        model={"layers": 8, **(model or {})},
                        apollo={"enabled": True, "stages": [2, 4, 8], "stage_ends": [3, 5],
                                **apollo},
                        train={"steps": 8, "out_dir": str(d / name),
                               "deepspeed_config": f"ds_configs/zero{zero}_{dtype}.json"})


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    """Every case's record, from one launch."""
    d = tmp_path_factory.mktemp("expansion")
    cases = []
    for zero, mode, dtype in CASES:
        # "llama": fp32, model.arch=llama with grouped-query attention (heads 4, kv_heads 2)
        llama = dtype == "llama"
        name = f"z{zero}_{mode}_{dtype}"
        cases.append({"name": name, "config": str(_config(
            d, corpus, name, zero, "fp32" if llama else dtype, {"optimizer_state": mode},
            model=LLAMA if llama else {}))})
    cases.append({"name": "copy_scaled", "config": str(_config(
        d, corpus, "copy_scaled", 1, "fp32", {"optimizer_state": "copy_scaled",
                                              "sampler": "constant_high"}))})
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun(2, "tests/distributed/workers/expansion_check.py",
             ["--cases", str(d / "cases.json"), "--out", str(d / "result.json")])
    return json.loads((d / "result.json").read_text())


@pytest.mark.parametrize("zero,mode,dtype", CASES)
def test_expansion_identity_and_state_transfer(zero, mode, dtype, results):
    r = results[f"z{zero}_{mode}_{dtype}"]
    llama = dtype == "llama"
    per_layer = 7 if llama else 12     # parameters of one pool layer
    assert (r["n_old"], r["n_new"], r["sources"]) == (2, 4, [0, 0, 1, 1])
    assert sorted(map(int, r["losses_before"])) == [4, 5, 6, 7, 8]
    for d, before in r["losses_before"].items():
        assert r["losses_after"][d] == pytest.approx(before, rel=1e-6, abs=1e-6), d
    # every new layer's fp32 master equals its source's, exactly
    assert r["max_diff"]["param"] == 0.0
    assert [r["moment_source"][str(i)] for i in range(4)] == MOMENTS[mode]
    if mode == "copy":
        assert r["max_diff"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
        assert r["nonzero_moments"] == r["n_params_after"]
    fresh = {i for i, s in enumerate(MOMENTS[mode]) if s is None}
    if fresh:
        assert r["n_params_after"] - r["nonzero_moments"] == len(fresh) * per_layer
    # Adam step counts: fresh layers start their own count at 0, every other group carries
    # the global step 3 (ZeRO: one counter per flat group, so fresh layers have own groups)
    for layers, offset, step in r["group_steps_after"]:
        assert step + offset == 3
        assert step == (0 if set(layers) & fresh else 3), (layers, offset, step)
        assert not (set(layers) & fresh) or set(layers) <= fresh
    # ... so the next step's update of a fresh layer is a fresh AdamW's first update
    # (bias-corrected at step 1) and its moments started from zero (m^2 (1-b2) = v (1-b1)^2)
    for i in fresh:
        assert r["fresh_update_err"][str(i)] < 1.0, i   # within fp32 rounding (worker)
        assert r["zero_start_err"][str(i)] < 1e-4, i
    assert r["step_before"] == r["step_after"] == 3
    losses = r["next_loss_per_rank"]
    assert losses[0] == losses[1] and losses[0] > 0


def test_copy_scaled_divides_moments_by_the_uses(results):
    # constant_high runs depth 8 always: each of 2 old layers runs 4 positions, each of the 4
    # new ones 2, so k = 4/2 = 2: the copies hold m/2 and v/4.
    r = results["copy_scaled"]
    assert [r["moment_source"][str(i)] for i in range(4)] == [-1] * 4   # scaled, not equal
    for i in range(4):
        m_ratio, v_ratio = r["moment_ratio"][str(i)]
        assert m_ratio == pytest.approx(2.0, rel=1e-6) and v_ratio == pytest.approx(4.0, rel=1e-6)

