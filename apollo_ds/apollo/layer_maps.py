"""Which pool layer runs at each position (weight sharing), and which old layer each new
layer copies at a stage boundary (growth).

interpolate: position i of a depth-d network runs pool layer floor(i*N/d): each unique layer
    fills one contiguous block, in order (N=3, d=8 -> [0,0,0,1,1,1,2,2]).
stack:       the release's cyclic order: the first N*floor(d/N) positions run 0..N-1 over and
    over, and the r = d mod N remaining positions run the LAST r layers, in order
    (N=3, d=6 -> [0,1,2,0,1,2]; N=3, d=8 -> [0,1,2,0,1,2,1,2]); ablation only.

Both growth rules are the layer map itself: new layer i copies old layer
``layer_map(n_old, n_new, grow)[i]`` (interpolate 3 -> 6: [0,0,1,1,2,2]; stack 2 -> 3: [0,1,1]),
as in the release, which builds its growth list with the same function as its layer lists.
"""
from __future__ import annotations

GROW_METHODS = ("interpolate", "stack")


def _check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name}={v!r} must be an integer")


def _check_grow(grow: str) -> None:
    if grow not in GROW_METHODS:
        raise ValueError(f"unknown grow method '{grow}'; choose one of "
                         f"{', '.join(GROW_METHODS)}")


def layer_map(N: int, d: int, grow: str = "interpolate") -> list[int]:
    """Pool index for each of the d positions of a network built from N unique layers.

    d >= N guarantees every pool layer is used (and so gets a gradient) in every micro-batch."""
    _check_int("N", N)
    _check_int("d", d)
    _check_grow(grow)
    if N < 1:
        raise ValueError(f"N={N}: the pool needs at least one unique layer")
    if d < N:
        raise ValueError(f"depth d={d} is below the number of unique layers N={N}; "
                         f"every pool layer must be used, so d >= N")
    if grow == "stack":
        full = (d // N) * N
        r = d - full
        return [i % N for i in range(full)] + [N - r + j for j in range(r)]
    return [i * N // d for i in range(d)]


def expansion_sources(n_old: int, n_new: int, grow: str = "interpolate") -> list[int]:
    """For each new unique layer i (0 <= i < n_new), the old layer it is initialised from.

    ``layer_map(n_old, n_new, grow)``: interpolate floor(i*n_old/n_new) (3 -> 6:
    [0,0,1,1,2,2]); stack the release's cyclic order (3 -> 6: [0,1,2,0,1,2]; 2 -> 3:
    [0,1,1]). With interpolation and n_old | n_new, the grown model at any depth d >= n_new
    runs exactly the old model's layer sequence at that depth."""
    _check_int("n_old", n_old)
    _check_int("n_new", n_new)
    _check_grow(grow)
    if n_old < 1:
        raise ValueError(f"n_old={n_old}: the pool needs at least one unique layer")
    if n_new < n_old:
        raise ValueError(f"cannot grow from {n_old} to {n_new} unique layers: n_new must be "
                         f">= n_old")
    return layer_map(n_old, n_new, grow)
