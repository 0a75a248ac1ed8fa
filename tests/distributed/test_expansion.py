"""ZeRO-aware expansion under 2 gloo processes: apollo.md's identity (loss at every depth
d >= N_new unchanged when N_old divides N_new), masters and Adam moments carried to every new
layer from its source, and training continuing identically on every rank."""
import json

import pytest

from tests.conftest import torchrun, write_config


@pytest.mark.parametrize("zero,mode,dtype", [(0, "copy", "fp32"), (1, "copy", "fp32"),
                                             (2, "copy", "fp32"), (3, "copy", "fp32"),
                                             (1, "reset", "fp32"), (1, "copy", "bf16"),
                                             (2, "copy", "bf16"), (3, "copy", "bf16")])
def test_expansion_identity_and_state_transfer(zero, mode, dtype, corpus, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", corpus,
                       model={"layers": 8},
                       apollo={"enabled": True, "stages": [2, 4, 8], "stage_ends": [3, 5],
                               "optimizer_state": mode},
                       train={"steps": 8, "out_dir": str(tmp_path / "out"),
                              "deepspeed_config": f"ds_configs/zero{zero}_{dtype}.json"})
    out = tmp_path / "result.json"
    torchrun(2, "tests/distributed/workers/expansion_check.py",
             ["--config", str(cfg), "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["n_old"], r["n_new"], r["sources"]) == (2, 4, [0, 0, 1, 1])
    assert sorted(map(int, r["losses_before"])) == [4, 5, 6, 7, 8]
    for d, before in r["losses_before"].items():
        assert r["losses_after"][d] == pytest.approx(before, rel=1e-6, abs=1e-6), d
    if mode == "copy":
        # every new layer's fp32 master and both Adam moments equal its source's, exactly
        assert r["max_diff"] == {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
        assert r["nonzero_moments"] == r["n_params_after"]
    else:
        # reset: masters still copied; the second copy of each old layer (pool 1 and 3)
        # starts from zero moments, the first copy keeps its source's
        assert r["max_diff"]["param"] == 0.0 and r["max_diff"]["exp_avg_sq"] > 0
        per_layer = r["n_params_after"] - r["nonzero_moments"]
        assert per_layer == 2 * 12   # 12 tensors per transformer layer, 2 fresh layers
    assert r["step_before"] == r["step_after"] == 3
    losses = r["next_loss_per_rank"]
    assert losses[0] == losses[1] and losses[0] > 0
