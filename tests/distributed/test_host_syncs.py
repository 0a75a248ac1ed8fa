"""At most one host sync per optimizer step on the training path: 11 real steps (2 gloo
processes, Apollo LVPS depths, gradient accumulation 2 or 4) with counters on the accelerator's
synchronize and on every tensor read into Python (workers/sync_count.py). The one read is the
Trainer's guard reduction (loss, gradient norm, stop flag: one .tolist()), at PP1 and PP2."""
import json

import pytest

from tests.conftest import torchrun, write_config


@pytest.mark.parametrize("pp,ds", [(1, "zero1_fp32"),
                                   pytest.param(1, "zero0_fp32", marks=pytest.mark.slow),
                                   (2, "zero1_fp32")],
                         ids=["pp1-zero1", "pp1-zero0", "pp2-zero1"])
def test_one_host_read_per_step(pp, ds, corpus, tmp_path):
    cfg = write_config(tmp_path / "run.yaml", corpus,
                       apollo={"enabled": True, "stages": [2, 4], "stage_ends": [12],
                               "sampler": "lvps"},
                       parallel={"pp": pp},
                       train={"steps": 20, "out_dir": str(tmp_path),
                              "deepspeed_config": f"ds_configs/{ds}.json"})
    out = tmp_path / "counts.json"
    torchrun(2, "tests/distributed/workers/sync_count.py",
             ["--config", str(cfg), "--out", str(out)], timeout=600)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for r in ranks:
        steps = r["steps"]
        assert len(steps) == 11
        for counts in steps:
            # torch's non-fused AdamW (CPU) reads its step counters, CPU tensors by design (no
            # device involved); the fused AdamW used on CUDA keeps them on the device
            counts.pop("optimizer_cpu_step_counter", None)
        # the first step of a pipeline stage receives its activations' shape once (DeepSpeed's
        # metadata exchange, cached after): 3 items + 1 tolist on the receiving stage
        first = dict(steps[0])
        first["tolist"] -= 1
        assert first in ({"tolist": 0}, {"tolist": 1, "item": 3}) if pp == 2 else \
            first == {"tolist": 0}, first
        for counts in steps[1:]:   # then 10 steps with exactly one read each
            assert counts == {"tolist": 1}, (counts, r["where"])
        where = {k.split(":")[0]: v for k, v in r["where"].items()
                 if not k.startswith("optimizer_cpu")}
        assert where.pop("tolist loop.py") == 11, r["where"]
        assert all(k.endswith(" engine.py") for k in where) and pp == 2 or not where, where
