"""Per-micro-batch depth samplers of Apollo (Pan et al., AAAI 2024).

Two views of the same distribution:
- ``sample_depth``: one draw, a pure function of (seed, step, micro, N), so every rank that
  works on one micro-batch computes the same depth with no communication.
- ``depth_pmf``: the exact distribution, obtained by inverting the monotone map x -> y of the
  release's formula (not by sampling), for planning, FLOPs accounting and tests.
"""
from __future__ import annotations

import hashlib
import math

SAMPLERS = ("lvps", "uniform", "sigmoid", "constant_high", "constant_low")

# Release constants: y(x0) = b = r + 0.4 and y(1) = e; x ~ U(x0, 1).
_E = 0.6
_X0 = 1e-6
_B_OFFSET = 0.4
_SIGMOID_SLOPE = 20.0


def _check(sampler: str, L: int, N: int) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}")
    for name, v in (("L", L), ("N", N)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}={v!r} must be an integer")
    if not 1 <= N <= L:
        raise ValueError(f"need 1 <= N <= L (unique layers N={N}, full depth L={L})")


def _uniform01(seed: int, step: int, micro: int, N: int) -> float:
    """A uniform float in [0, 1) from a stable hash (blake2b, not Python's salted hash()),
    so the value is identical across processes, hosts and Python versions."""
    key = f"apollo_ds.depth:{int(seed)}:{int(step)}:{int(micro)}:{int(N)}".encode()
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return (h >> 11) * (1.0 / (1 << 53))     # top 53 bits -> every double in [0,1) grid


# --- the release's multiplier curves y(x), both strictly decreasing on [x0, 1] -------------

def _lvps_params(r: float) -> tuple[float, float]:
    b = r + _B_OFFSET
    n = (b * _X0 - _E) / (_E - b)
    m = _E * (n + 1.0)
    return m, n


def _y_of_x(sampler: str, r: float, x: float) -> float:
    b = r + _B_OFFSET
    if sampler == "lvps":
        m, n = _lvps_params(r)
        return m / (x + n)
    # sigmoid; exp overflow is impossible since x <= 1
    return (b - _E) / (1.0 + math.exp(_SIGMOID_SLOPE * (x - 0.5))) + _E


def _x_of_y(sampler: str, r: float, y: float) -> float:
    """Inverse of ``_y_of_x`` for y in (e, b)."""
    b = r + _B_OFFSET
    if sampler == "lvps":
        m, n = _lvps_params(r)
        return m / y - n
    return 0.5 + math.log((b - _E) / (y - _E) - 1.0) / _SIGMOID_SLOPE


def _depth_from_y(y: float, r: float, L: int, N: int) -> int:
    """d = floor(clip(y, 1, r) * N). The clip to r is mapped to L directly: (L/N)*N may round
    to just below L in floating point, and floor would then give L-1."""
    if y >= r:
        return L
    if y <= 1.0:
        return N
    d = math.floor(y * N)
    return min(max(d, N), L)


def sample_depth(sampler: str, L: int, N: int, seed: int, step: int, micro: int) -> int:
    """Depth for global micro-batch ``micro`` (0-based) of optimizer step ``step`` (1-based).

    Deterministic in its arguments; always N <= d <= L, and L when N == L."""
    _check(sampler, L, N)
    if N == L or sampler == "constant_high":
        return L
    if sampler == "constant_low":
        return N
    u = _uniform01(seed, step, micro, N)
    if sampler == "uniform":
        return min(N + int(u * (L - N + 1)), L)
    x = _X0 + (1.0 - _X0) * u
    r = L / N
    return _depth_from_y(_y_of_x(sampler, r, x), r, L, N)


def depth_pmf(sampler: str, L: int, N: int) -> dict[int, float]:
    """Exact P(d = k) for k = N..L (every depth is a key; values sum to 1).

    For lvps/sigmoid: y is strictly decreasing in x, so {d >= k} = {y >= k/N} = {x <= t_k}
    with t_k = x(k/N) for N < k <= L (k/N lies in (1, r], inside the curve's range (e, b)).
    P(d = k) is the U(x0, 1) measure of (t_{k+1}, t_k]; t_N = 1, t_{L+1} = x0. Boundaries
    where y*N is exactly integral have measure zero, so they do not affect the pmf."""
    _check(sampler, L, N)
    ks = range(N, L + 1)
    if N == L or sampler == "constant_high":
        return {k: float(k == L) for k in ks}
    if sampler == "constant_low":
        return {k: float(k == N) for k in ks}
    if sampler == "uniform":
        return {k: 1.0 / (L - N + 1) for k in ks}
    r = L / N
    # t[k] = largest x with d >= k, clamped into [x0, 1]
    t = {N: 1.0, L + 1: _X0}
    for k in range(N + 1, L + 1):
        t[k] = min(max(_x_of_y(sampler, r, k / N), _X0), 1.0)
    width = 1.0 - _X0
    pmf = {k: max(t[k] - t[k + 1], 0.0) / width for k in ks}
    total = sum(pmf.values())                # == 1 up to rounding; renormalise the residue
    return {k: p / total for k, p in pmf.items()}


def expected_depth(sampler: str, L: int, N: int) -> float:
    return sum(k * p for k, p in depth_pmf(sampler, L, N).items())


def expected_uses(sampler: str, L: int, N: int, grow: str = "interpolate") -> list[float]:
    """Expected number of positions pool layer j (0 <= j < N) runs in one micro-batch:
    sum over d of P(d) * #{i : layer_map(N, d)[i] == j}, from the exact pmf. Sums to E[d]."""
    from .layer_maps import layer_map
    uses = [0.0] * N
    for d, p in depth_pmf(sampler, L, N).items():
        if p > 0:
            for j in layer_map(N, d, grow):
                uses[j] += p
    return uses
