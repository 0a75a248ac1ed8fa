"""apollo.update_scale=inv_uses under 2 gloo processes: the pool layers' first AdamW update is
made at 1/k of the schedule's lr, k = E[d]/N, and every other parameter's at the full lr, at
ZeRO 1 and 3 and with bf16 (DeepSpeed keeps the groups' lr_scale key and set_lr reaches the
optimizer that steps). constant_high with N = 1 of L = 4 runs depth 4: k = 4, scale 1/4."""
import json

import pytest

from tests.conftest import torchrun, write_config


@pytest.mark.parametrize("zero,dtype,scale", [(1, "fp32", "inv_uses"), (3, "fp32", "inv_uses"),
                                              (1, "bf16", "inv_uses"), (1, "fp32", "none")])
def test_pool_update_is_scaled(zero, dtype, scale, corpus, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", corpus,
                       apollo={"enabled": True, "stages": [1, 4], "stage_ends": [3],
                               "sampler": "constant_high", "update_scale": scale},
                       train={"steps": 6, "out_dir": str(tmp_path / "out"),
                              "deepspeed_config": f"ds_configs/zero{zero}_{dtype}.json"})
    out = tmp_path / "result.json"
    torchrun(2, "tests/distributed/workers/first_update_check.py",
             ["--config", str(cfg), "--out", str(out)])
    r = json.loads(out.read_text())
    pool_scale = "0.25" if scale == "inv_uses" else "1.0"
    other = "1.0" if pool_scale == "0.25" else "0.25"
    assert any(n.startswith("pool.") for n in r["errors"])
    for name, err in r["errors"].items():
        want = pool_scale if name.startswith("pool.") else "1.0"
        assert err[want] < 1e-3, (name, err)
        if name.startswith("pool.") and scale == "inv_uses":
            assert err[other] > 0.5, (name, err)   # the unscaled update is clearly excluded
