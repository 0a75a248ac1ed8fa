"""train.on_nonfinite=skip inside every runtime (2 gloo processes, one engine after another):
a step whose gradients are NaN on ONE rank (the norm check) and a step whose loss reads NaN on
one rank while its gradients stay finite (the loss check: DeepSpeed alone would apply that
step) are both dropped by every rank before the optimizer step: masters, Adam moments and the
optimizer step count stay exactly as they were, the other steps train, and the pre-step
gradient norm the run reports is the one DeepSpeed's own step computes (computed once: the step
reuses it), at fp32 ZeRO 0 the 2-norm of the module's gradients."""
import json
import math

import pytest

from tests.conftest import torchrun, write_config

FAULT = "nan_grad@step=2@rank=1,nan_loss@step=4@rank={loss_rank}"
PP1 = ["zero0_fp32", "zero1_bf16", "zero2_fp32", "zero3_bf16"]   # basic, BF16, ZeRO 1/2, ZeRO 3
PP2 = ["zero0_fp32", "zero1_bf16"]


@pytest.mark.parametrize("pp,configs", [(1, PP1), (2, PP2)], ids=["pp1", "pp2"])
def test_skip_leaves_state_untouched(pp, configs, corpus, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", corpus,
                       model={"layers": 2, "hidden": 64, "heads": 2, "seq_len": 32},
                       parallel={"pp": pp},
                       train={"steps": 5, "on_nonfinite": "skip", "out_dir": str(tmp_path)})
    out = tmp_path / "result.json"
    ds = ",".join(f"ds_configs/{c}.json" for c in configs)
    # at pp=2 rank 1 is the last stage, the only one that computes a loss
    env = {"APOLLO_DS_FAULT": FAULT.format(loss_rank=1 if pp == 2 else 0)}
    r = torchrun(2, "tests/distributed/workers/nonfinite_check.py",
                 ["--config", str(cfg), "--out", str(out), "--ds", ds], env=env)
    depths = [2] * (8 // (2 * (2 // pp)))   # full depth per micro-batch: 8 / (2 x dp)
    assert f"warning: non-finite gradient norm nan at step 2 (depths {depths}, samples " \
           f"8..15): step skipped (1 in a row, train.max_skipped=10)" in r.stdout
    assert "warning: non-finite loss nan at step 4" in r.stdout
    result = json.loads(out.read_text())
    for c in configs:
        steps = result[f"ds_configs/{c}.json"]
        assert [s["skipped"] for s in steps] == [False, True, False, True, False], c
        assert [s["optimizer_steps"] for s in steps] == [1, 1, 2, 2, 3], c
        for s in steps:
            if s["skipped"]:
                assert s["change"] == 0.0 and s["loss"] is None, (c, s)   # bit-identical
            else:
                assert 0 < s["loss"] < math.log(corpus.vocab) + 1, (c, s)  # finite, trains
                assert s["change"] is None or s["change"] > 1e-3, (c, s)  # it does train
                if c.startswith("zero0") and pp == 2:   # no reference norm recorded
                    assert s["ds_norm"] is None and 0 < s["grad_norm"] < math.inf, (c, s)
                else:   # fp32 ZeRO 0 at PP1: the worker's own norm of the module's gradients
                    rel = 1e-5 if c.startswith("zero0") else 1e-6
                    assert s["grad_norm"] == pytest.approx(s["ds_norm"], rel=rel), (c, s)
        if not c.startswith("zero0"):
            assert steps[1]["ds_norm"] == math.inf          # DeepSpeed saw the NaN too
            assert math.isfinite(steps[3]["ds_norm"])       # but not the NaN loss
