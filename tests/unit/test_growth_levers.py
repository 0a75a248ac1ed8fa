"""The growth levers as pure functions: optimizer state at growth (copy, copy_scaled, reset,
release) and per-layer Adam step offsets, expected uses and moment scales from the exact depth
pmf, TP-layout-independent growth noise, the lr schedules (cosine, wsd, re-warmup), the
update-scale multipliers and the parameter groups that carry them."""
import math
from types import SimpleNamespace

import pytest
import torch

from apollo_ds.apollo.expand import (GrowthNoise, grow_state, grow_step_offsets,
                                     moment_scales)
from apollo_ds.apollo.samplers import expected_depth, expected_uses
from apollo_ds.config import load_config, validate
from apollo_ds.training.engine import lr_at, param_groups, pool_lr_scale, set_lr

BASE = ["data.prefix=x", "data.tokenizer=y"]


def cfg_of(*overrides):
    return validate(load_config("configs/tiny_cpu.yaml", BASE + list(overrides)),
                    check_files=False)


def _state(n, shape=(4, 3)):
    """pool.<i>.w with param i, exp_avg 10+i, exp_avg_sq 100+i; an embedding."""
    st = {"emb": {k: torch.full(shape, v) for k, v in
                  (("param", -1.0), ("exp_avg", -2.0), ("exp_avg_sq", -3.0))}}
    for i in range(n):
        st[f"pool.{i}.w"] = {"param": torch.full(shape, float(i)),
                             "exp_avg": torch.full(shape, 10.0 + i),
                             "exp_avg_sq": torch.full(shape, 100.0 + i)}
    return st


def _first(entry, key):
    v = entry[key]
    return None if v is None else v.flatten()[0].item()


@pytest.mark.parametrize("mode,m,v", [
    ("copy", [10, 10, 11, 11], [100, 100, 101, 101]),
    ("reset", [10, None, 11, None], [100, None, 101, None]),
    # release: layer i < 2 keeps old layer i's own moments (layer 1 keeps 11, not its
    # source 0's 10); layers 2, 3 were never used by the release and start from zero
    ("release", [10, 11, None, None], [100, 101, None, None]),
    ("copy_scaled", [5, 5, 5.5, 5.5], [25, 25, 25.25, 25.25])])
def test_grow_state_modes(mode, m, v):
    scales = [2.0] * 4 if mode == "copy_scaled" else None
    out = grow_state(_state(2), 2, 4, "interpolate", mode, scales)
    assert [_first(out[f"pool.{i}.w"], "param") for i in range(4)] == [0, 0, 1, 1]
    assert [_first(out[f"pool.{i}.w"], "exp_avg") for i in range(4)] == m
    assert [_first(out[f"pool.{i}.w"], "exp_avg_sq") for i in range(4)] == v
    assert _first(out["emb"], "exp_avg") == -2.0 and sorted(out) == sorted(
        ["emb"] + [f"pool.{i}.w" for i in range(4)])


def test_grow_state_stack_release():
    # stack 2 -> 3 copies [0, 1, 1]; release keeps layers 0, 1's own state, layer 2 is fresh
    out = grow_state(_state(2), 2, 3, "stack", "release")
    assert [_first(out[f"pool.{i}.w"], "param") for i in range(3)] == [0, 1, 1]
    assert [_first(out[f"pool.{i}.w"], "exp_avg") for i in range(3)] == [10, 11, None]


def test_step_offsets():
    # old offsets [0, 5] (layer 1 started a fresh Adam at step 5), expansion after step 9
    assert grow_step_offsets([0, 5], 2, 4, "interpolate", "copy", 9) == [0, 0, 5, 5]
    assert grow_step_offsets([0, 5], 2, 4, "interpolate", "copy_scaled", 9) == [0, 0, 5, 5]
    assert grow_step_offsets([0, 5], 2, 4, "interpolate", "reset", 9) == [0, 9, 5, 9]
    assert grow_step_offsets([0, 5], 2, 4, "interpolate", "release", 9) == [0, 5, 9, 9]
    assert grow_step_offsets([0, 0, 0], 3, 6, "stack", "reset", 4) == [0, 0, 0, 4, 4, 4]


def test_expected_uses_from_the_pmf():
    # constant_high: depth L always; N=2 of L=8 -> each layer runs 4 positions, N=4 -> 2
    assert expected_uses("constant_high", 8, 2) == [4.0, 4.0]
    assert expected_uses("constant_high", 8, 4) == [2.0] * 4
    assert moment_scales([4.0, 4.0], [2.0] * 4, [0, 0, 1, 1]) == [2.0] * 4
    # uniform L=4, N=2: d = 2, 3, 4 w.p. 1/3; maps [0,1], [0,0,1], [0,0,1,1]
    assert expected_uses("uniform", 4, 2) == pytest.approx([5 / 3, 4 / 3])
    # stack d=3: [0,1,1] -> layer 1 runs the extra position
    assert expected_uses("uniform", 4, 2, "stack") == pytest.approx([4 / 3, 5 / 3])
    # lvps sums to E[d] (apollo.md's table: L=12, N=3 -> 4.23)
    assert sum(expected_uses("lvps", 12, 3)) == pytest.approx(4.23, abs=0.01)
    assert expected_uses("lvps", 12, 12) == [1.0] * 12


def test_growth_noise_is_layout_independent_and_relative():
    torch.manual_seed(0)
    w = torch.randn(6, 4) * 0.5
    state = {"pool.0.w": {"param": w, "exp_avg": None, "exp_avg_sq": None}}
    std = {"pool.0.w": w.std().item()}
    one = grow_state(state, 1, 2, noise=GrowthNoise(0.1, 7, 1, std, {"w": 0}))
    shards = []
    for r in range(2):
        local = {"pool.0.w": {"param": w.chunk(2, 0)[r], "exp_avg": None, "exp_avg_sq": None}}
        shards.append(grow_state(local, 1, 2, noise=GrowthNoise(0.1, 7, 1, std, {"w": 0},
                                                                tp=2, tp_rank=r)))
    # the first copy is exact; the second gets noise, the same at TP=1 and TP=2
    assert torch.equal(one["pool.0.w"]["param"], w)
    assert torch.equal(torch.cat([s["pool.1.w"]["param"] for s in shards]),
                       one["pool.1.w"]["param"])
    assert not torch.equal(one["pool.1.w"]["param"], w)
    # deterministic in (seed, name, stage), different for another stage
    again = grow_state(state, 1, 2, noise=GrowthNoise(0.1, 7, 1, std, {"w": 0}))
    other = grow_state(state, 1, 2, noise=GrowthNoise(0.1, 7, 2, std, {"w": 0}))
    assert torch.equal(again["pool.1.w"]["param"], one["pool.1.w"]["param"])
    assert not torch.equal(other["pool.1.w"]["param"], one["pool.1.w"]["param"])
    # relative: noise / (sigma std(w)) is a standard normal draw
    big = torch.randn(200, 200) * 3.0
    st = {"pool.0.w": {"param": big, "exp_avg": None, "exp_avg_sq": None}}
    out = grow_state(st, 1, 2, noise=GrowthNoise(0.01, 7, 1, {"pool.0.w": 3.0}, {}))
    z = (out["pool.1.w"]["param"] - big) / (0.01 * 3.0)
    assert abs(z.mean().item()) < 0.02 and z.std().item() == pytest.approx(1.0, abs=0.02)


def test_cosine_schedule_unchanged():
    cfg = cfg_of("train.steps=200", "train.warmup=10", "train.lr=1e-3", "train.min_lr=1e-4")
    assert lr_at(5, cfg) == pytest.approx(5e-4)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(105, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 2)))
    assert lr_at(200, cfg) == pytest.approx(1e-4)


def test_wsd_decays_after_the_last_expansion():
    # tiny_cpu: stages end at 10, 20, 50 of 200; decay=0 decays over the last stage (51..200)
    cfg = cfg_of("train.lr_schedule=wsd", "train.warmup=5", "train.lr=1e-3",
                 "train.min_lr=1e-4")
    assert lr_at(5, cfg) == pytest.approx(1e-3) and lr_at(3, cfg) == pytest.approx(6e-4)
    assert [lr_at(s, cfg) for s in (6, 20, 50)] == [pytest.approx(1e-3)] * 3
    assert lr_at(125, cfg) == pytest.approx(1e-3 - 9e-4 * 75 / 150)
    assert lr_at(200, cfg) == pytest.approx(1e-4)
    # decay=0.2: the last 40 steps
    cfg = cfg_of("train.lr_schedule=wsd", "train.decay=0.2", "train.warmup=5",
                 "train.lr=1e-3", "train.min_lr=0")
    assert lr_at(160, cfg) == pytest.approx(1e-3)
    assert lr_at(180, cfg) == pytest.approx(5e-4)


def test_rewarmup_after_each_expansion():
    cfg = cfg_of("train.rewarmup_steps=4", "train.warmup=5")
    plain = cfg_of("train.warmup=5")
    for e in (10, 20, 50):        # expansions after these steps
        for j in range(1, 6):     # steps e+1 .. e+5: factors 1/4, 2/4, 3/4, 1, 1
            assert lr_at(e + j, cfg) == pytest.approx(lr_at(e + j, plain) * min(j / 4, 1))
    assert lr_at(9, cfg) == lr_at(9, plain) and lr_at(100, cfg) == lr_at(100, plain)


def test_lr_after_growth_raises_the_last_stage_and_still_ends_at_min_lr():
    # tiny_cpu: expansions after steps 10, 20, 50 of 200; cosine after a 5-step warmup
    base = ("train.warmup=5", "train.lr=1e-3", "train.min_lr=1e-4")
    cfg, plain = cfg_of("train.lr_after_growth=2", *base), cfg_of(*base)
    for s in (1, 5, 10, 20, 50):               # up to the last expansion: unchanged
        assert lr_at(s, cfg) == lr_at(s, plain)
    for s in (51, 120, 199, 200):              # after it: twice the height above min_lr
        cosine = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (s - 5) / 195))
        assert lr_at(s, cfg) == pytest.approx(1e-4 + 2 * (cosine - 1e-4))
    assert lr_at(51, cfg) == pytest.approx(2 * lr_at(51, plain) - 1e-4)
    assert lr_at(200, cfg) == pytest.approx(1e-4)
    # with a re-warmup the ramp multiplies the raised schedule
    both = cfg_of("train.lr_after_growth=2", "train.rewarmup_steps=4", *base)
    assert lr_at(52, both) == pytest.approx(lr_at(52, cfg) * 2 / 4)
    # without Apollo there is no growth: the option changes nothing
    off = cfg_of("apollo.enabled=false", "train.lr_after_growth=2", *base)
    assert [lr_at(s, off) for s in (60, 150)] == [
        lr_at(s, cfg_of("apollo.enabled=false", *base)) for s in (60, 150)]


def test_update_scale_multipliers():
    # inv_uses: N / E[d]; apollo.md's table for L=12: E[d] = 1.77, 4.23, 7.13 at N = 1, 3, 6
    cfg = cfg_of("model.layers=12", "apollo.stages=[1,3,6,12]", "apollo.update_scale=inv_uses")
    for n, ed in ((1, 1.77), (3, 4.23), (6, 7.13)):
        assert pool_lr_scale(cfg, n) == pytest.approx(n / ed, rel=0.01)
        assert pool_lr_scale(cfg, n) == pytest.approx(n / expected_depth("lvps", 12, n))
    assert pool_lr_scale(cfg, 12) == 1.0
    high = cfg_of("model.layers=8", "apollo.stages=[2,8]", "apollo.stage_ends=[0.25]",
                  "apollo.sampler=constant_high", "apollo.update_scale=inv_uses")
    assert pool_lr_scale(high, 2) == 0.25     # depth 8 from 2 layers: 4 uses each
    assert pool_lr_scale(cfg_of(), 1) == 1.0  # update_scale none


def test_param_groups_and_set_lr():
    model = torch.nn.Module()
    model.emb = torch.nn.Parameter(torch.zeros(5, 2))
    model.pool = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
    default = param_groups(model, 0.01)
    assert [(len(g["params"]), g["weight_decay"]) for g in default] == [(3, 0.01), (2, 0.0)]
    groups = param_groups(model.named_parameters(), 0.01, [0, 7], pool_lr_scale=0.5)
    keys = [(g["step_offset"], g["lr_scale"], g["weight_decay"], g["pool_layers"],
             len(g["params"])) for g in groups]
    assert keys == [(0, 1.0, 0.01, [], 1), (0, 0.5, 0.01, [0], 1), (0, 0.5, 0.0, [0], 1),
                    (7, 0.5, 0.01, [1], 1), (7, 0.5, 0.0, [1], 1)]
    engine = SimpleNamespace(optimizer=SimpleNamespace(param_groups=groups))
    set_lr(engine, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 5e-4, 5e-4, 5e-4, 5e-4]
