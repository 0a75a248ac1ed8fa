"""benchmarks/acceleration_report.py and acceleration_methods.py: the ablation's arithmetic
(interpolated FLOPs to a target, per-seed pairing, the no-difference rule, expected FLOPs of a
schedule, --define parsing) against hand-computed numbers. No training runs."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import acceleration_methods as am  # noqa: E402
import acceleration_report as ar   # noqa: E402


def curve(losses, flops_per_eval):
    return [{"step": 10 * (i + 1), "eval_loss": x, "flops": flops_per_eval * (i + 1),
             "wall_s": 2.0 * (i + 1), "train_s": 1.0 * (i + 1)} for i, x in enumerate(losses)]


def test_first_reach_interpolates_between_evaluations():
    pts = curve([6.0, 5.5, 5.0, 4.9], 100.0)
    hit = ar.first_reach(pts, 5.2)
    # between (200, 5.5) and (300, 5.0): 5.2 is 3/5 of the way
    assert hit["step"] == 30
    assert hit["flops"] == pytest.approx(260.0)
    assert hit["wall_s"] == pytest.approx(5.2)
    assert ar.first_reach(pts, 4.0) is None
    assert ar.first_reach(pts, 7.0)["flops"] == pytest.approx(100.0)


def test_verdict_uses_the_larger_seed_spread():
    # the figures: scratch 4.954/4.836/4.904, constant_low 6->12 4.896/4.801/4.857:
    # mean difference -0.0467 is inside scratch's spread 0.118 -> no difference
    v = ar.verdict([4.896, 4.801, 4.857], [4.954, 4.836, 4.904])
    assert v["mean_diff"] == pytest.approx((4.896 + 4.801 + 4.857 - 4.954 - 4.836 - 4.904) / 3)
    assert v["seed_spread"] == pytest.approx(0.118)
    assert v["verdict"] == "no difference"
    assert ar.verdict([5.30, 5.34], [4.95, 4.84])["verdict"] == "worse"
    assert ar.verdict([4.60, 4.62], [4.95, 4.84])["verdict"] == "better"
    assert ar.verdict([4.6], [4.9])["verdict"].startswith("one seed")


def _run(method, seed, steps, losses, fpe, definition=None, mode="steps", lr=1e-3):
    d = definition or am.get(method)
    return {"method": method, "definition": d, "lr": lr, "seed": seed, "steps": steps,
            "mode": mode, "config": {"apollo": d["apollo"]}, "curve": curve(losses, fpe)}


def test_comparisons_pair_by_seed_and_ratio_to_scratch():
    runs = {}
    for seed, s_losses, g_losses in ((1, [6.0, 5.0, 4.8], [6.2, 4.9, 4.7]),
                                     (2, [6.0, 5.1, 4.9], [6.3, 5.2, 4.95])):
        for r in (_run("scratch", seed, 400, s_losses, 100.0),
                  _run("grow6_12_const", seed, 400, g_losses, 80.0)):
            runs[ar.run_key(r["method"], r["lr"], seed, 400)] = r
    store = {"benchmark": {"steps": 400}, "runs": runs}
    rows = {r["method"]: r for r in ar.comparisons(store)}
    g = rows["grow6_12_const"]
    assert g["seeds"] == [1, 2]
    # seed 1: target 4.8, reached between (160, 4.9) and (240, 4.7) at 200; scratch at 300
    # seed 2: target 4.9, never reached (ends 4.95)
    assert g["per_seed"][0]["flops_ratio_at_target"] == pytest.approx(200.0 / 300.0)
    assert g["per_seed"][1]["flops_ratio_at_target"] is None
    assert g["reached"] == "1/2"
    assert g["gap"]["mean"] == pytest.approx((-0.1 + 0.05) / 2)
    assert g["flops_total"]["mean"] == pytest.approx(0.8)
    assert g["verdict"] == "no difference"           # |-0.025| <= spread 0.25
    assert rows["scratch"]["flops_at_target"]["mean"] == pytest.approx(1.0)


def test_expected_cost_of_one_growth():
    # h=128, s=128: per layer 2*12*128^2 + 4*128*128 = 458752; head 2*128*1024 = 262144
    per, head = 458752, 262144
    full, six = 12 * per + head, 6 * per + head
    want = 0.25 * six / full + 0.75
    got = am.expected_cost(am.get("grow6_12_const"), 12, 128, 128, 1024)
    assert got == pytest.approx(want)
    assert am.expected_cost(am.get("scratch"), 12, 128, 128, 1024) == 1.0


def test_define_and_baseline_family():
    name, m = am.parse_define("g4: apollo.stages=[4,12] apollo.stage_ends=[0.3] "
                              "train.lr_schedule=wsd train.decay=0.7")
    assert name == "g4"
    assert m["apollo"]["stages"] == [4, 12] and m["apollo"]["sampler"] == "constant_low"
    assert am.baseline_for(m) == "scratch_wsd"
    assert am.baseline_for(am.get("grow6_12_const")) == "scratch"
    with pytest.raises(ValueError, match="is not apollo|train|model.KEY=VALUE"):
        am.parse_define("bad: stages=[4,12]")


def test_recommended_preset_is_the_measured_method():
    """configs/recommended_grow_tiny.yaml must be the method and LR the committed ablation
    measured (benchmarks/results/acceleration.json), on the benchmark's shape."""
    import json
    from apollo_ds.config import load_config, validate
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    cfg = validate(load_config(os.path.join(root, "configs", "recommended_grow_tiny.yaml")),
                   check_files=False)
    with open(os.path.join(root, "benchmarks", "results", "acceleration.json")) as f:
        store = json.load(f)
    run = store["runs"][ar.run_key("grow3_12_const", cfg.train.lr, cfg.train.seed,
                                   cfg.train.steps)]
    for k, v in run["config"]["apollo"].items():
        assert getattr(cfg.apollo, k) == v, k
    assert cfg.train.lr == store["sweeps"]["cosine"]["best"]
    assert store["sweeps"]["cosine"]["bracketed"]
    b = store["benchmark"]
    assert (cfg.model.layers, cfg.model.hidden, cfg.model.vocab_size, cfg.train.global_batch) \
        == (b["layers"], b["hidden"], b["vocab"], b["global_batch"])
