"""benchmarks/acceleration_horizon.py: the horizon study's arithmetic (FLOPs to a target, from
the first crossing and from where a curve stays below, the after-growth gaps, the fallback to
the equal-FLOPs run, the OLS trend and its standard error) against hand-computed numbers."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import acceleration_horizon as ah  # noqa: E402


def run(method, losses, flops_per_eval, lr=1e-3, seed=1, mode="steps", ends=(0.5,), steps=40):
    curve = [{"step": 10 * (i + 1), "eval_loss": x, "flops": flops_per_eval * (i + 1),
              "wall_s": 1.0 * (i + 1), "train_s": 1.0 * (i + 1)} for i, x in enumerate(losses)]
    return {"method": method, "lr": lr, "seed": seed, "mode": mode, "steps": steps,
            "config": {"apollo": {"stage_ends": list(ends)}}, "curve": curve,
            "final_eval_loss": losses[-1], "total_flops": curve[-1]["flops"]}


def test_target_ratio_first_crossing_and_for_good():
    base = run("scratch", [6.0, 5.0, 4.5, 4.0], 100.0)          # target 4.0 at 400 FLOPs
    # dips to 3.9 at 20, back above at 30 (4.2), below for good at 40 (3.8)
    r = run("g", [5.0, 3.9, 4.2, 3.8], 80.0)
    # first crossing: between (80, 5.0) and (160, 3.9): 1.0/1.1 of the way -> 152.727...
    assert ah.target_ratio(r, base) == pytest.approx((80 + 80 * 1.0 / 1.1) / 400)
    # for good: between (240, 4.2) and (320, 3.8): half way -> 280
    assert ah.target_ratio(r, base, for_good=True) == pytest.approx(280 / 400)
    assert ah.target_ratio(run("g", [5.0, 4.5, 4.2, 4.1], 80.0), base) is None
    assert ah.target_ratio(None, base) is None


def test_after_growth_gaps_and_flops_share():
    base = run("scratch", [6.0, 5.0, 4.5, 4.0], 100.0)
    # growth at 0.5 x 40 = step 20: the evals after it are steps 30 and 40
    r = run("g", [7.0, 6.5, 4.6, 3.9], 60.0, ends=(0.5,))
    g = ah.after_growth(r, base)
    assert g["flops_share"] == pytest.approx(240 / 400)
    assert g["gap_first_after"] == pytest.approx(0.1)
    assert g["gap_mean_after"] == pytest.approx((0.1 - 0.1) / 2)


def store_of(*runs, best=1e-3):
    return {"benchmark": {"steps": 40},
            "sweeps": {"cosine": {"best": best, "bracketed": True, "seed": 1,
                                  "results": {f"{best:g}": 4.0}}},
            "runs": {f"{r['method']}_lr{r['lr']:g}_s{r['seed']}_n40"
                     + ("_flops" if r["mode"] == "flops" else ""): r for r in runs}}


def test_horizon_point_uses_the_equal_flops_run_when_equal_steps_never_reaches():
    base = run("scratch", [6.0, 5.0, 4.5, 4.0], 100.0)
    steps_run = run("rec", [7.0, 6.0, 4.4, 4.1], 60.0, lr=5e-4)       # never <= 4.0
    flops_run = run("rec", [7.0, 6.0, 4.4, 4.2, 3.9], 60.0, lr=5e-4, mode="flops")
    worse = run("rec", [7.0, 6.0, 4.6, 4.3], 60.0, lr=2e-3)
    pt = ah.horizon_point(store_of(base, steps_run, flops_run, worse), "rec")
    assert pt["recipe_lr"] == 5e-4 and pt["recipe_bracketed"] is False
    (s,) = pt["seeds"]
    assert s["from"] == "flops"
    # between (240, 4.2) and (300, 3.9): 2/3 of the way -> 280
    assert s["ratio"] == pytest.approx(280 / 400)
    assert s["gap_steps"] == pytest.approx(0.1)
    assert s["gap_flops"] == pytest.approx(-0.1)
    assert s["ratio_eq_flops"] is None                 # it is already the ratio


def test_horizon_point_prefers_equal_steps_and_reports_the_equal_flops_run_beside_it():
    base = run("scratch", [6.0, 5.0, 4.5, 4.0], 100.0)
    steps_run = run("rec", [7.0, 6.0, 4.2, 3.95], 60.0)               # 4.0 at 230 FLOPs
    flops_run = run("rec", [7.0, 5.0, 4.0, 3.9, 3.8], 60.0, mode="flops")  # 4.0 at 180
    (s,) = ah.horizon_point(store_of(base, steps_run, flops_run), "rec")["seeds"]
    assert s["from"] == "steps"
    # between (180, 4.2) and (240, 3.95): 0.2 / 0.25 of the way -> 228
    assert s["ratio"] == pytest.approx(228 / 400)
    assert s["ratio_eq_flops"] == pytest.approx(180 / 400)


def test_fit_matches_an_independent_least_squares():
    ratios = {400: [0.71, 0.77], 800: [0.64, 0.54], 3200: [0.67, 0.69, 0.81]}
    points = [{"steps": n, "seeds": [{"ratio": r} for r in rs]} for n, rs in ratios.items()]
    tr = ah.fit(points)
    x = np.array([math.log2(n / 400) for n, rs in ratios.items() for _ in rs])
    y = np.array([r for rs in ratios.values() for r in rs])
    (b, a), cov = np.polyfit(x, y, 1, cov="unscaled")
    resid = y - (a + b * x)
    se = math.sqrt(cov[0, 0] * (resid @ resid) / (len(x) - 2))
    assert (tr["a"], tr["b"], tr["b_se"], tr["n"]) == (
        pytest.approx(a), pytest.approx(b), pytest.approx(se), 7)
    assert ah.fit([{"steps": 400, "seeds": [{"ratio": 0.7}, {"ratio": 0.8}]}]) is None
