"""No rank ever holds the whole model's state during an expansion or a save: every gathered
tensor (another rank's data) is tracked while alive (workers/memory_bound_check.py); during an
expansion the largest set alive at once is bounded by the largest single parameter, not by
the model, and a save gathers nothing (each rank writes its own share). Under ZeRO-3 the grown
model is built partitioned."""
import json

import pytest

from tests.conftest import torchrun, write_config


def _run(tmp_path, corpus, zero, parallel=None):
    cfg = write_config(tmp_path / "run.yaml", corpus, model={"layers": 8},
                       apollo={"enabled": True, "stages": [2, 4, 8], "stage_ends": [3, 5]},
                       parallel=parallel or {},
                       train={"steps": 8, "out_dir": str(tmp_path / "out"),
                              "deepspeed_config": f"ds_configs/zero{zero}_fp32.json"})
    out = tmp_path / "result.json"
    torchrun(2, "tests/distributed/workers/memory_bound_check.py",
             ["--config", str(cfg), "--out", str(out)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("zero,parallel", [(3, {}), (0, {}), (1, {"tp": 2}),
                                           (1, {"pp": 2})])
def test_expansion_and_save_gather_one_parameter_at_a_time(zero, parallel, corpus, tmp_path):
    ranks = _run(tmp_path, corpus, zero, parallel)
    dp = 2 // (parallel.get("tp", 1) * parallel.get("pp", 1))
    # the ranks' own files together store every element (TP replicas and the pipeline's tied
    # embedding copy are written by each holder, hence >=)
    assert sum(r["save"]["bytes"] for r in ranks) >= 12 * sum(ranks[0]["full_numel"]), ranks
    for r in ranks:
        # ZeRO-3 builds the grown model partitioned (deepspeed.zero.Init): no parameter is
        # whole on any rank when the model comes out of its constructor and initialisation
        assert r["built_partitioned"] == [zero == 3], r["built_partitioned"]
        model_state = 12 * sum(r["full_numel"])          # fp32 master + 2 moments, all of it
        # expansion: one gather of (master, exp_avg, exp_avg_sq) of one TP shard at a time,
        # and every grown parameter's source gathered exactly once (optimizer_state=copy)
        e = r["expand"]
        assert 0 < e["peak"] <= 12 * r["largest_tp_numel"], (r["rank"], e)
        if not parallel.get("pp"):   # under PP the gather covers every stage's parameters
            assert e["total"] == 12 * sum(r["tp_numel"]), (r["rank"], e)
        assert e["peak"] * 4 < model_state, (r["rank"], e)
        # save: nothing gathered from another rank, and each rank writes at most its own
        # share: 1/dp (rounded up, as ZeRO pads) of the parameters it holds (its TP shard,
        # its pipeline stage), 12 bytes an element
        s = r["save"]
        assert s["calls"] == 0 and s["peak"] == 0, (r["rank"], s)
        share = 12 * sum(-(-n // dp) for n in r["tp_numel"])
        assert 0 < s["bytes"] <= share, (r["rank"], s, share)
        assert s["bytes"] < model_state, (r["rank"], s, model_state)
