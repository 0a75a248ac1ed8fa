"""benchmarks/gpu_check.py --smoke: the GPU check's whole code path on the CPU (tiny shapes, about
20 s on 2 cores), so a lent GPU machine's few minutes are never spent finding a broken script.
Asserts on the numbers in its JSON, not on its console table."""
from __future__ import annotations

import json
import math

from tests.conftest import PY, run


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = run([PY, "benchmarks/gpu_check.py", "--smoke", "--out", str(out),
             "--work-dir", str(tmp_path / "work")], timeout=300)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    res = json.loads(out.read_text())
    assert res["complete"] and res["smoke"]
    ph = res["phases"]
    tput = {"tput_recompute_none", "tput_recompute_selective", "tput_recompute_full",
            "tput_compile", "tput_compile_recompute_full", "tput_zero2", "tput_zero3",
            "tput_llama_compile"}
    assert set(ph) == tput | {"pool_vs_plain", "apollo", "resume"}
    for name, x in ph.items():
        assert "error" not in x, (name, x.get("error"))
        assert x["tokens_per_s"] > 0 and math.isfinite(x["tokens_per_s"]), name
    assert res["peak_tflops"] is None and ph["tput_recompute_none"]["mfu"] is None  # CPU: n/a
    for key in tput:
        assert ph[key]["model_tflops"] > 0, key
    assert ph["tput_llama_compile"]["arch"] == "llama" and ph["tput_llama_compile"]["compile"]
    assert ph["tput_zero3"]["ds_config"] == "ds_configs/zero3_fp32.json"
    # the same model, batches and seed: recompute and compile change no loss (fp32, dropout 0)
    base = ph["tput_recompute_none"]["losses"]
    for key in ("tput_recompute_selective", "tput_recompute_full", "tput_compile",
                "tput_compile_recompute_full", "tput_zero2", "tput_zero3"):
        assert max(abs(a - b) for a, b in zip(ph[key]["losses"], base)) < 1e-4, key

    pp = ph["pool_vs_plain"]
    assert pp["pool"]["tokens_per_s"] > 0 and pp["plain"]["tokens_per_s"] > 0
    assert math.isfinite(pp["ratio_pool_over_plain"]) and pp["ratio_pool_over_plain"] > 0
    assert pp["max_loss_diff"] < 1e-5     # same weights, batches and engine: same computation

    ex = ph["apollo"]["expansions"]
    assert [(e["from"], e["to"]) for e in ex] == [(1, 2), (2, 4)]
    for e in ex:
        assert math.isfinite(e["seconds"]) and e["seconds"] > 0
        assert math.isfinite(e["in_median_steps"]) and e["in_median_steps"] > 0

    rs = ph["resume"]
    assert rs["resumed_at"] == rs["stop_after"]
    assert rs["determinism"] == "strict"
    assert rs["max_abs_loss_diff"] == 0.0, (rs["losses_straight"], rs["losses_resumed"])
    assert rs["eval_loss_diff"] == 0.0
