"""train.compile: torch.compile per transformer block. 10 steps with LVPS depth sampling and
an expansion (2 -> 4 unique layers at step 5) over 2 gloo processes give the eager run's losses
within 1e-5, and torch.compile builds its graphs in the first step (plus the evaluation's
no-grad ones), never again: new depths, new pool layers after the expansion and new positions
reuse them. With and without recompute, at DP2, TP2 and PP2. Dropout is 0: compiled dropout
draws from inductor's own generator, so its masks differ from eager's."""
import json

import pytest

from tests.conftest import pretrain, read_metrics, torchrun, write_config

LAYOUTS = {
    "dp2": ({"tp": 1, "pp": 1}, "none"),
    "tp2": ({"tp": 2, "pp": 1}, "full"),
    "pp2": ({"tp": 1, "pp": 2}, "selective"),
}


def _config(tmp_path, corpus, name, parallel, recompute, compile_):
    return write_config(tmp_path / f"{name}.yaml", corpus,
                        model={"dropout": 0.0},
                        apollo={"enabled": True, "stages": [2, 4], "stage_ends": [5],
                                "sampler": "lvps"},
                        parallel=parallel,
                        train={"steps": 10, "recompute": recompute, "compile": compile_,
                               "out_dir": str(tmp_path / name)})


@pytest.mark.slow   # 90-150 s each on 2 cores, most of it inductor compiling
@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2"])
def test_compiled_blocks_match_eager(layout, corpus, tmp_path):
    parallel, recompute = LAYOUTS[layout]
    pretrain(2, _config(tmp_path, corpus, "eager", parallel, recompute, False))
    out = tmp_path / "compile.json"
    torchrun(2, "tests/distributed/workers/compile_check.py",
             ["--config", str(_config(tmp_path, corpus, "compiled", parallel, recompute, True)),
              "--out", str(out)])
    eager, compiled = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert [r["n_unique"] for r in compiled] == [2] * 5 + [4] * 5
    assert [r["depths"] for r in compiled] == [r["depths"] for r in eager]
    assert len({d for r in compiled for d in r["depths"]}) > 1      # LVPS sampled depths
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    assert abs(eager[-1]["eval_loss"] - compiled[-1]["eval_loss"]) < 1e-5
    res = json.loads(out.read_text())
    g = res["graphs_after_step"]
    assert len(g) == 10 and g[0] > 0
    # built in step 1; steps 2-10 (other depths, the expansion's new layers) add none
    # (the final evaluation's no-grad graphs come after step 10)
    assert g == [g[0]] * 10, g
    assert g[0] <= 12, g       # a few graphs per block class and autograd mode, not per layer
