"""StageSchedule: stage boundaries, expansions and the per-micro-batch plan."""
import pytest

from apollo_ds.apollo import StageSchedule, layer_map
from apollo_ds.config import RunConfig, validate


def _cfg(tmp_path, steps, enabled=True, stages=(1, 3, 6, 12), ends=(0.05, 0.10, 0.25),
         layers=12, micro=2, global_batch=8, seed=42, sampler="lvps", grow="interpolate"):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    cfg = RunConfig()
    cfg.model.layers, cfg.model.hidden, cfg.model.heads = layers, 64, 4
    cfg.apollo.enabled, cfg.apollo.stages, cfg.apollo.stage_ends = enabled, list(stages), list(ends)
    cfg.apollo.sampler, cfg.apollo.grow = sampler, grow
    cfg.train.steps, cfg.train.micro_batch, cfg.train.global_batch = steps, micro, global_batch
    cfg.train.seed, cfg.train.deepspeed_config = seed, str(ds)
    cfg.data.prefix, cfg.data.tokenizer = "unused", "unused.model"
    return validate(cfg)


@pytest.mark.parametrize("steps,ends", [(40, [2, 4, 10, 40]), (400, [20, 40, 100, 400])])
def test_release_schedule_boundaries(tmp_path, steps, ends):
    s = StageSchedule(_cfg(tmp_path, steps))
    assert s.num_stages == 4
    assert [s.end_step(k) for k in range(4)] == ends
    assert [s.start_step(k) for k in range(4)] == [1] + [e + 1 for e in ends[:-1]]
    for k, (lo, hi) in enumerate(zip([1] + [e + 1 for e in ends[:-1]], ends)):
        for step in (lo, hi):
            assert s.stage_index(step) == k
            assert s.unique_at(step) == [1, 3, 6, 12][k]
    expansions = [t for t in range(1, steps + 1) if s.is_expansion_after(t)]
    assert expansions == ends[:-1]


def test_explicit_step_numbers(tmp_path):
    s = StageSchedule(_cfg(tmp_path, 100, stages=(2, 4, 12), ends=(10, 35)))
    assert [(s.start_step(k), s.end_step(k)) for k in range(3)] == [(1, 10), (11, 35), (36, 100)]
    assert s.unique_at(1) == 2 and s.unique_at(10) == 2 and s.unique_at(11) == 4
    assert s.unique_at(36) == 12 and s.unique_at(100) == 12
    assert s.is_expansion_after(10) and s.is_expansion_after(35)
    assert not s.is_expansion_after(11) and not s.is_expansion_after(100)
    with pytest.raises(ValueError):
        s.stage_index(0)
    with pytest.raises(ValueError):
        s.stage_index(101)
    with pytest.raises(ValueError):
        s.start_step(3)


def test_plan_is_deterministic_and_consistent(tmp_path):
    cfg = _cfg(tmp_path, 400, micro=2, global_batch=16)
    s = StageSchedule(cfg)
    assert s.micro_batches_per_step == 8
    for step in (1, 20, 21, 40, 41, 100, 101, 400):
        plan = s.plan(step)
        assert plan == StageSchedule(cfg).plan(step)   # fresh object, same plan
        assert len(plan) == 8
        N = s.unique_at(step)
        for j, (d, m) in enumerate(plan):
            assert N <= d <= 12
            assert m == layer_map(N, d)
            assert d == s.depth(step, j)
    # the last stage is full depth everywhere
    assert all(d == 12 and m == list(range(12)) for d, m in s.plan(101))
    # depths vary across the first stage
    assert len({d for step in range(1, 21) for d, _ in s.plan(step)}) > 1


def test_plan_uses_seed_and_grow(tmp_path):
    a = StageSchedule(_cfg(tmp_path, 400, seed=1))
    b = StageSchedule(_cfg(tmp_path, 400, seed=2))
    assert [a.plan(t) for t in range(1, 41)] != [b.plan(t) for t in range(1, 41)]
    st = StageSchedule(_cfg(tmp_path, 400, grow="stack", sampler="constant_high"))
    assert st.plan(30) == [(12, [0, 1, 2] * 4)] * 4


def test_disabled_apollo_is_full_depth(tmp_path):
    s = StageSchedule(_cfg(tmp_path, 50, enabled=False))
    assert s.num_stages == 1
    assert (s.start_step(0), s.end_step(0)) == (1, 50)
    assert not any(s.is_expansion_after(t) for t in range(1, 51))
    for step in (1, 2, 25, 50):
        assert s.unique_at(step) == 12
        assert s.plan(step) == [(12, list(range(12)))] * 4
    assert s.stage_pmf(0) == {12: 1.0}
