"""apollo.update_scale=inv_uses under 2 gloo processes: the pool layers' first AdamW update is
made at 1/k of the schedule's lr, k = E[d]/N, and every other parameter's at the full lr, at
ZeRO 1 and 3 and with bf16 (DeepSpeed keeps the groups' lr_scale key and set_lr reaches the
optimizer that steps). constant_high with N = 1 of L = 4 runs depth 4: k = 4, scale 1/4.
The cases run in one torchrun launch (workers/first_update_check.py: a Trainer per case)."""
import json

import pytest

from tests.conftest import torchrun, write_config


CASES = [(1, "fp32", "inv_uses"), (3, "fp32", "inv_uses"), (1, "bf16", "inv_uses"),
         (1, "fp32", "none")]


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory):
    """Every case's first update, from one torchrun launch."""
    d = tmp_path_factory.mktemp("update_scale")
    cases = [{"name": f"z{zero}_{dtype}_{scale}", "config": str(write_config(
        d / f"z{zero}_{dtype}_{scale}.yaml", corpus,
        apollo={"enabled": True, "stages": [1, 4], "stage_ends": [3],
                "sampler": "constant_high", "update_scale": scale},
        train={"steps": 6, "out_dir": str(d / f"z{zero}_{dtype}_{scale}"),
               "deepspeed_config": f"ds_configs/zero{zero}_{dtype}.json"}))}
        for zero, dtype, scale in CASES]
    (d / "cases.json").write_text(json.dumps(cases))
    torchrun(2, "tests/distributed/workers/first_update_check.py",
             ["--cases", str(d / "cases.json"), "--out", str(d / "result.json")])
    return json.loads((d / "result.json").read_text())


@pytest.mark.parametrize("zero,dtype,scale", CASES)
def test_pool_update_is_scaled(zero, dtype, scale, results):
    r = results[f"z{zero}_{dtype}_{scale}"]
    pool_scale = "0.25" if scale == "inv_uses" else "1.0"
    other = "1.0" if pool_scale == "0.25" else "0.25"
    assert any(n.startswith("pool.") for n in r["errors"])
    for name, err in r["errors"].items():
        want = pool_scale if name.startswith("pool.") else "1.0"
        assert err[want] < 1e-3, (name, err)
        if name.startswith("pool.") and scale == "inv_uses":
            assert err[other] > 0.5, (name, err)   # the unscaled update is clearly excluded
