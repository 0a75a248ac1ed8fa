"""Pool expansion at an Apollo stage boundary as a pure transform of the full training state
(design/architecture.md, "The Runtime seam"): the runtime gathers every parameter's full fp32
master and Adam moments by canonical name (``pool.<i>.<rest>`` for pool layers), this module
says what the grown pool's state is, and the runtime scatters it into a new engine's
partitions. No engine, process group or device is touched here.

New pool layer i starts as a copy of old layer ``expansion_sources(n_old, n_new, grow)[i]``:
its master weights, and (``optimizer_state=copy``) its Adam moments too; with ``reset`` the
first copy of every old layer keeps its moments and the other copies start from zero moments.
"""
from __future__ import annotations

from apollo_ds.apollo.layer_maps import expansion_sources


def source_name(name: str, sources: list[int]) -> str:
    """pool.<i>.rest -> pool.<sources[i]>.rest; other names map to themselves."""
    parts = name.split(".")
    if parts[0] == "pool":
        parts[1] = str(sources[int(parts[1])])
    return ".".join(parts)


def fresh_layers(sources: list[int]) -> set[int]:
    """The genuinely new layers: every copy of an old layer but its first."""
    seen, fresh = set(), set()
    for i, s in enumerate(sources):
        (fresh.add(i) if s in seen else seen.add(s))
    return fresh


def pool_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "pool" else None


def grown_names(names, n_new: int) -> list[str]:
    """Canonical names of the grown model: the non-pool names, then pool.<i>.<rest> for every
    new layer i and every <rest> a pool layer has."""
    rests = sorted({n.split(".", 2)[2] for n in names if pool_index(n) is not None})
    return ([n for n in names if pool_index(n) is None]
            + [f"pool.{i}.{r}" for i in range(n_new) for r in rests])


def grow_state(state: dict, n_old: int, n_new: int, grow: str = "interpolate",
               optimizer_state: str = "copy") -> dict:
    """The full state of the grown pool: canonical name -> {"param", "exp_avg",
    "exp_avg_sq"}, a moment None meaning zero. Entries are shared with ``state``, not copied
    (the runtime writes them out)."""
    sources = expansion_sources(n_old, n_new, grow)
    fresh = fresh_layers(sources) if optimizer_state == "reset" else set()
    out = {}
    for name in grown_names(list(state), n_new):
        src = state[source_name(name, sources)]
        entry = dict(src)
        if pool_index(name) in fresh:
            entry["exp_avg"] = entry["exp_avg_sq"] = None
        out[name] = entry
    return out
