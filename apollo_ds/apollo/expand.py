"""Pool expansion at an Apollo stage boundary as a pure, per-parameter transform of the
training state: ``expansion_rules`` says, for each parameter of the grown pool (canonical
names, ``pool.<i>.<rest>`` for pool layers), which old parameter's fp32 master and which
one's Adam moments it starts from, and ``apply_rule`` makes one new entry from those. The
runtime streams the rules over its sharded state, one parameter at a time
(training/growth.py), so no rank ever holds the whole model's state; ``grow_state`` applies
them to a whole in-memory state. No engine, process group or device is touched here.

New pool layer i always starts from the master weights of old layer
``s_i = expansion_sources(n_old, n_new, grow)[i]``. Its Adam state (``apollo.optimizer_state``):

copy         s_i's moments and s_i's Adam step count.
copy_scaled  s_i's moments rescaled for the uses they summed: a layer that ran k positions
             per micro-batch accumulated k gradients, so m ~ k g and v ~ k^2 g^2. With
             u_old[s] the expected uses of old layer s per micro-batch in the old stage and
             u_new[i] those of new layer i in the new stage (both exact, from the depth pmf
             and the layer map: ``samplers.expected_uses``), k_i = u_old[s_i] / u_new[i] and
             the copy gets m / k_i, v / k_i^2 (k_i = u_old[s_i] when the new stage is the
             last, where every layer runs once). Adam's next update m/sqrt(v) is unchanged;
             what changes is how the moments mix with the copy's own, smaller gradients.
reset        the first copy of every old layer keeps s_i's moments and step count; every other
             copy (``fresh_layers``) starts as a fresh Adam: zero moments, its own step count
             from 0 (so its first updates are bias-corrected like any new parameter's).
release      what the authors' release does. The release holds the full-depth stack h[0..L-1]
             with one optimizer from step 0, trains h[0..N-1] in a stage with N unique layers
             (its layer lists index h by the layer map's pool indices) and, at a boundary,
             overwrites h[i] (i < N_new) with a copy of h[s_i]'s weights (``param.data``),
             leaving the optimizer state keyed to h[i] alone. So apollo_ds's pool layer i IS
             the release's h[i]: for i < n_old, new layer i takes s_i's weights but keeps OLD
             LAYER i's own moments and step count (now stale where s_i != i); for i >= n_old,
             h[i] never received a gradient (its state was never created), so it starts as a
             fresh Adam: zero moments, step count from 0.

Adam step counts are tracked per pool layer as a step offset: layer i's Adam step is
``global step - offsets[i]`` (``grow_step_offsets``); the runtime puts layers with different
offsets in different parameter groups, since ZeRO keeps one step counter per flat group.

Symmetry breaking (``apollo.growth_noise = sigma > 0``, ``GrowthNoise``): every fresh copy (all
copies of an old layer but its first) gets ``sigma * std(source tensor) * N(0, 1)`` added to
its master weights. The noise is drawn as the FULL (unsharded) tensor from a generator seeded by
(seed, new parameter name, new stage) and each tensor-parallel rank keeps its slice; the std is
of the full tensor (the runtime reduces it over the TP group). So TP=1 and TP=2 grow the same
weights, on every rank and at every ZeRO stage (each parameter's ZeRO partitions are gathered
before its rule runs).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from apollo_ds.apollo.layer_maps import expansion_sources

OPTIMIZER_STATE_MODES = ("copy", "copy_scaled", "reset", "release")


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


def pool_rest(name: str) -> str:
    """pool.<i>.<rest> -> <rest>."""
    return name.split(".", 2)[2]


def grown_names(names, n_new: int) -> list[str]:
    """Canonical names of the grown model: the non-pool names, then pool.<i>.<rest> for every
    new layer i and every <rest> a pool layer has."""
    rests = sorted({pool_rest(n) for n in names if pool_index(n) is not None})
    return ([n for n in names if pool_index(n) is None]
            + [f"pool.{i}.{r}" for i in range(n_new) for r in rests])


def _check_mode(mode: str) -> None:
    if mode not in OPTIMIZER_STATE_MODES:
        raise ValueError(f"unknown optimizer_state '{mode}'; choose one of "
                         f"{', '.join(OPTIMIZER_STATE_MODES)}")


def grow_step_offsets(offsets: list[int], n_old: int, n_new: int, grow: str, mode: str,
                      step: int) -> list[int]:
    """Per-layer Adam step offsets of the grown pool (layer i's Adam step = global step -
    offset) after an expansion at global step ``step``: fresh-Adam layers get ``step``."""
    _check_mode(mode)
    if len(offsets) != n_old:
        raise ValueError(f"{len(offsets)} step offsets for a pool of {n_old} layers")
    sources = expansion_sources(n_old, n_new, grow)
    if mode == "release":
        return [offsets[i] if i < n_old else step for i in range(n_new)]
    fresh = fresh_layers(sources) if mode == "reset" else set()
    return [step if i in fresh else offsets[s] for i, s in enumerate(sources)]


def moment_scales(uses_old: list[float], uses_new: list[float], sources: list[int]
                  ) -> list[float]:
    """k_i = u_old[s_i] / u_new[i] for copy_scaled (see the module docstring)."""
    if len(uses_new) != len(sources):
        raise ValueError(f"{len(uses_new)} new-stage use counts for {len(sources)} layers")
    return [uses_old[s] / uses_new[i] for i, s in enumerate(sources)]


def _generator(seed: int, name: str, stage: int) -> torch.Generator:
    digest = hashlib.sha256(f"growth_noise:{seed}:{name}:{stage}".encode()).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


@dataclass
class GrowthNoise:
    """Relative Gaussian noise on fresh copies. ``std``: canonical source name -> std of the
    FULL tensor; ``layout``: <rest> of a pool tensor -> its tensor-parallel partition dim
    (absent or None: replicated); ``tp``/``tp_rank``: this rank's slice."""
    sigma: float
    seed: int
    stage: int
    std: dict = field(default_factory=dict)
    layout: dict = field(default_factory=dict)
    tp: int = 1
    tp_rank: int = 0

    def sample(self, name: str, src_name: str, local: torch.Tensor) -> torch.Tensor:
        """The noise for this rank's slice ``local`` of parameter ``name``."""
        dim = self.layout.get(pool_rest(name))
        shape = list(local.shape)
        if dim is not None and self.tp > 1:
            shape[dim] *= self.tp
        full = torch.randn(shape, generator=_generator(self.seed, name, self.stage),
                           dtype=torch.float32)
        if dim is not None and self.tp > 1:
            full = full.chunk(self.tp, dim=dim)[self.tp_rank]
        return (full * (self.sigma * float(self.std[src_name]))).to(local.device)


@dataclass(frozen=True)
class Rule:
    """How one parameter of the grown pool is made from the old state: ``source``'s master
    weights, ``moments``' Adam moments (None: zero, a fresh Adam) divided by ``scale`` and
    ``scale``^2 (copy_scaled; None: unchanged), plus growth noise where ``noise``."""
    name: str
    source: str
    moments: str | None
    scale: float | None = None
    noise: bool = False


def expansion_rules(names, n_old: int, n_new: int, grow: str = "interpolate",
                    optimizer_state: str = "copy", scales: list[float] | None = None
                    ) -> list[Rule]:
    """One Rule per parameter of the grown model (``grown_names`` order), from the old
    model's canonical ``names``: what ``grow_state`` does, one parameter at a time, so a
    runtime can stream it over sharded state (see the module docstring for the modes)."""
    _check_mode(optimizer_state)
    sources = expansion_sources(n_old, n_new, grow)
    fresh = fresh_layers(sources)
    if optimizer_state == "copy_scaled" and (scales is None or len(scales) != n_new):
        raise ValueError("optimizer_state=copy_scaled needs one moment scale per new layer")
    rules = []
    for name in grown_names(list(names), n_new):
        src = source_name(name, sources)
        i = pool_index(name)
        if i is None:
            rules.append(Rule(name, src, src))
            continue
        moments, scale = src, None
        if optimizer_state == "reset" and i in fresh:
            moments = None
        elif optimizer_state == "release":
            moments = name if i < n_old else None
        elif optimizer_state == "copy_scaled":
            scale = float(scales[i])
        rules.append(Rule(name, src, moments, scale, i in fresh))
    return rules


def apply_rule(rule: Rule, param: torch.Tensor, moments: dict | None,
               noise: GrowthNoise | None = None) -> dict:
    """{"param", "exp_avg", "exp_avg_sq"} of ``rule.name`` from its source's ``param`` and
    the moments entry ``moments`` (of ``rule.moments``; None or a None moment: zero). Tensors
    that need no change are returned as given, not copied."""
    m = moments.get("exp_avg") if moments is not None else None
    v = moments.get("exp_avg_sq") if moments is not None else None
    if rule.scale is not None:
        k = rule.scale
        m = m / k if m is not None else None
        v = v / (k * k) if v is not None else None
    if noise is not None and noise.sigma > 0 and rule.noise:
        param = param + noise.sample(rule.name, rule.source, param)
    return {"param": param, "exp_avg": m, "exp_avg_sq": v}


def grow_state(state: dict, n_old: int, n_new: int, grow: str = "interpolate",
               optimizer_state: str = "copy", scales: list[float] | None = None,
               noise: GrowthNoise | None = None) -> dict:
    """The full state of the grown pool: canonical name -> {"param", "exp_avg",
    "exp_avg_sq"}, a moment None meaning zero; ``apply_rule`` over ``expansion_rules`` on a
    whole in-memory state (the runtime streams the same rules over its shards instead).
    ``scales``: k_i per new layer (copy_scaled only, ``moment_scales``); ``noise``: symmetry
    breaking on fresh copies."""
    return {r.name: apply_rule(r, state[r.source]["param"],
                               state[r.moments] if r.moments else None, noise)
            for r in expansion_rules(list(state), n_old, n_new, grow, optimizer_state, scales)}
