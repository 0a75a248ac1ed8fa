"""Depth samplers: exact pmf against apollo.md's reference table and against draws of the
release's literal formula, determinism, ranges."""
import math

import numpy as np
import pytest

from apollo_ds.apollo import SAMPLERS, depth_pmf, expected_depth, sample_depth

# (L, N): P(d=N), E[d], {d: P(d)} tails — apollo.md, 400k draws of the release formula.
TABLE = {
    (12, 1): (0.735, 1.77, {2: 0.105, 12: 0.002}),
    (12, 3): (0.636, 4.23, {4: 0.104, 12: 0.016}),
    (12, 6): (0.648, 7.13, {7: 0.086, 12: 0.066}),
    (6, 1): (0.772, 1.44, {6: 0.007}),
    (6, 2): (0.729, 2.53, {6: 0.028}),
    (6, 3): (0.733, 3.48, {6: 0.067}),
}


@pytest.mark.parametrize("L,N", sorted(TABLE))
def test_lvps_pmf_matches_reference_table(L, N):
    p_n, e_d, tails = TABLE[(L, N)]
    pmf = depth_pmf("lvps", L, N)
    assert sorted(pmf) == list(range(N, L + 1))
    assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
    assert pmf[N] == pytest.approx(p_n, abs=0.01)
    assert expected_depth("lvps", L, N) == pytest.approx(e_d, abs=0.02)
    for d, p in tails.items():
        assert pmf[d] == pytest.approx(p, abs=0.01)


def _release_formula(L, N, n_draws, rng, sampler="lvps"):
    """apollo.md's formula, vectorised and written literally (independent of samplers.py)."""
    r = L / N
    b, e, x0 = r + 0.4, 0.6, 1e-6
    x = rng.uniform(x0, 1.0, n_draws)
    if sampler == "lvps":
        n = (b * x0 - e) / (e - b)
        m = e * (n + 1)
        y = m / (x + n)
    else:
        y = (b - e) / (1 + np.exp(20 * (x - 0.5))) + e
    y = np.maximum(np.minimum(y, r), 1)
    return np.floor(y * N + 1e-9).astype(int)   # +1e-9: (L/N)*N may round below L


@pytest.mark.parametrize("sampler", ["lvps", "sigmoid"])
@pytest.mark.parametrize("L,N", [(12, 1), (12, 3), (12, 6), (6, 2), (7, 3)])
def test_exact_pmf_matches_400k_draws_of_release_formula(sampler, L, N):
    d = _release_formula(L, N, 400_000, np.random.default_rng(0), sampler)
    freq = np.bincount(d, minlength=L + 1) / d.size
    pmf = depth_pmf(sampler, L, N)
    for k in range(L + 1):
        assert freq[k] == pytest.approx(pmf.get(k, 0.0), abs=0.01)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("L,N", [(12, 1), (12, 3), (12, 6), (6, 2), (7, 3)])
def test_sample_depth_frequencies_match_pmf(sampler, L, N):
    # 60k (step, micro) pairs: binomial sd <= 0.0021, tolerance 0.01 (~5 sd; deterministic)
    draws = [sample_depth(sampler, L, N, 42, s, j) for s in range(1, 601) for j in range(100)]
    assert min(draws) >= N and max(draws) <= L
    freq = np.bincount(draws, minlength=L + 1) / len(draws)
    pmf = depth_pmf(sampler, L, N)
    for k in range(L + 1):
        assert freq[k] == pytest.approx(pmf.get(k, 0.0), abs=0.01)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_depth_always_in_range(sampler):
    for L in (1, 2, 5, 12, 24):
        for N in range(1, L + 1):
            ds = [sample_depth(sampler, L, N, 3, s, j) for s in (1, 7, 99) for j in range(40)]
            assert all(N <= d <= L for d in ds)
            pmf = depth_pmf(sampler, L, N)
            assert sorted(pmf) == list(range(N, L + 1))
            assert math.isclose(sum(pmf.values()), 1.0, abs_tol=1e-12)
            assert all(p >= 0 for p in pmf.values())


def test_deterministic_and_seed_dependent():
    a = [sample_depth("lvps", 12, 3, 42, s, j) for s in range(1, 51) for j in range(8)]
    b = [sample_depth("lvps", 12, 3, 42, s, j) for s in range(1, 51) for j in range(8)]
    c = [sample_depth("lvps", 12, 3, 43, s, j) for s in range(1, 51) for j in range(8)]
    assert a == b
    assert a != c
    # micro index and step both matter
    col = [sample_depth("uniform", 12, 1, 0, 5, j) for j in range(50)]
    row = [sample_depth("uniform", 12, 1, 0, s, 0) for s in range(1, 51)]
    assert len(set(col)) > 1 and len(set(row)) > 1


def test_full_stage_is_always_full_depth():
    for sampler in SAMPLERS:
        for L in (1, 6, 12):
            assert {sample_depth(sampler, L, L, 42, s, j)
                    for s in range(1, 20) for j in range(10)} == {L}
            assert depth_pmf(sampler, L, L) == {L: 1.0}
            assert expected_depth(sampler, L, L) == L


def test_uniform_and_constants():
    assert depth_pmf("uniform", 12, 3) == {k: pytest.approx(0.1) for k in range(3, 13)}
    assert expected_depth("uniform", 12, 3) == pytest.approx(7.5)
    assert depth_pmf("constant_high", 12, 3)[12] == 1.0
    assert depth_pmf("constant_low", 12, 3)[3] == 1.0
    assert sum(depth_pmf("constant_low", 12, 3).values()) == 1.0
    assert {sample_depth("constant_high", 12, 3, 1, s, 0) for s in range(1, 30)} == {12}
    assert {sample_depth("constant_low", 12, 3, 1, s, 0) for s in range(1, 30)} == {3}


def test_sigmoid_puts_mass_on_both_ends():
    pmf = depth_pmf("sigmoid", 12, 3)
    assert pmf[3] == pytest.approx(0.4285, abs=1e-3)
    assert pmf[12] == pytest.approx(0.393, abs=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_depth("nope", 12, 3, 0, 1, 0)
    with pytest.raises(ValueError, match="N <= L"):
        depth_pmf("lvps", 3, 6)
    with pytest.raises(ValueError, match="N <= L"):
        sample_depth("lvps", 12, 0, 0, 1, 0)


def test_names_agree_with_config():
    from apollo_ds import config
    from apollo_ds.apollo import GROW_METHODS
    assert SAMPLERS == config.SAMPLERS
    assert GROW_METHODS == config.GROW_METHODS
