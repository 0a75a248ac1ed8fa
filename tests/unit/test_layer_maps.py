"""Layer maps (weight sharing) and expansion sources (growth) — apollo.md's examples and
the expansion identity."""
import pytest

from apollo_ds.apollo import expansion_sources, layer_map


def test_documented_examples():
    assert layer_map(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert layer_map(6, 9) == [0, 0, 1, 2, 2, 3, 4, 4, 5]
    assert layer_map(1, 5) == [0] * 5
    assert layer_map(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert layer_map(4, 4) == [0, 1, 2, 3]


def test_stack_matches_the_release_cyclic_order():
    # The release (stack_meta_layer): full cycles 0..N-1, then the last r = d mod N layers.
    assert layer_map(3, 8, "stack") == [0, 1, 2, 0, 1, 2, 1, 2]
    assert layer_map(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert layer_map(3, 7, "stack") == [0, 1, 2, 0, 1, 2, 2]
    assert layer_map(4, 6, "stack") == [0, 1, 2, 3, 2, 3]
    assert layer_map(1, 4, "stack") == [0, 0, 0, 0]
    assert expansion_sources(2, 3, "stack") == [0, 1, 1]
    assert expansion_sources(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert expansion_sources(6, 12, "stack") == list(range(6)) * 2


@pytest.mark.parametrize("grow", ["interpolate", "stack"])
def test_every_pool_layer_used_at_every_depth(grow):
    for L in range(1, 25):
        for N in range(1, L + 1):
            for d in range(N, L + 1):
                m = layer_map(N, d, grow)
                assert len(m) == d
                assert set(m) == set(range(N))
                if grow == "interpolate":   # contiguous blocks, in order
                    assert m == sorted(m)


def test_expansion_sources():
    assert expansion_sources(3, 6) == [0, 0, 1, 1, 2, 2]
    assert expansion_sources(3, 6, "stack") == [0, 1, 2, 0, 1, 2]
    assert expansion_sources(6, 12) == [i // 2 for i in range(12)]
    assert expansion_sources(1, 3) == [0, 0, 0]
    assert expansion_sources(4, 4) == [0, 1, 2, 3]


def test_expansion_identity_when_old_divides_new():
    # The grown model runs exactly the old model's layer sequence at every depth d >= n_new.
    checked = 0
    for n_old in range(1, 13):
        for n_new in range(n_old, 25, n_old):
            src = expansion_sources(n_old, n_new)
            for d in range(n_new, 30):
                assert [src[m] for m in layer_map(n_new, d)] == layer_map(n_old, d)
                checked += 1
    assert checked > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="d >= N"):
        layer_map(3, 2)
    with pytest.raises(ValueError, match="at least one"):
        layer_map(0, 2)
    with pytest.raises(ValueError, match="unknown grow"):
        layer_map(2, 4, "blend")
    with pytest.raises(ValueError, match="n_new must be"):
        expansion_sources(6, 3)
    with pytest.raises(ValueError, match="must be an integer"):
        layer_map(2.0, 4)
