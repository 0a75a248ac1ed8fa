"""The runtime side of an Apollo expansion, streamed one parameter at a time.

1. every rank keeps its own fragments of the old engine's fp32 masters and Adam moments
   (``Runtime.shard_source``: its ZeRO partition of its TP shard, no gather) and the old engine
   is destroyed;
2. the new engine is built for the grown pool (ZeRO-3: partitioned from the start) and primed;
3. for each parameter of the grown pool, in one global order, the ranks gather the source
   parameter's TP shard from the fragments (one all-reduce over the data-parallel group, and
   the pipeline group under PP), apply the pure rule of apollo/expand.py, and the ranks that
   hold the new parameter write their own part of it into the new engine; then the buffer goes.

Per-rank memory bound: the new engine, plus the old engine's fp32 optimizer shard (12 bytes
per old parameter / dp at ZeRO 1-3; at fp32 ZeRO 0 an even 1/dp slice of it), plus at most
5 x the largest single parameter's TP shard in fp32 (one gather of master + 2 moments, a
second of 2 moments under optimizer_state=release, and the rescaled or noised copies
replacing them), plus, with growth noise, that parameter's full (TP-unsharded) noise tensor.
``shards.METER`` records the gathered part of it.
"""
from __future__ import annotations

from apollo_ds.apollo.expand import (GrowthNoise, apply_rule, expansion_rules,
                                     grow_step_offsets, moment_scales)
from apollo_ds.apollo.layer_maps import expansion_sources
from apollo_ds.apollo.samplers import expected_uses
from apollo_ds.training import faults
from apollo_ds.training.shards import MOMENTS, ShardSource
from apollo_ds.training.state import set_step_counts, write_entry


def grow(runtime, cfg, n_new: int, step: int, new_stage: int) -> None:
    """Replace ``runtime``'s engine by one for ``n_new`` pool layers whose state is the grown
    state of the old one, after global step ``step``, entering stage ``new_stage``
    (collective: every rank calls it)."""
    a, L = cfg.apollo, cfg.model.layers
    n_old = runtime.n_unique
    sampler = a.sampler if a.enabled else "constant_high"
    scales = None
    if a.optimizer_state == "copy_scaled":
        scales = moment_scales(expected_uses(sampler, L, n_old, a.grow),
                               expected_uses(sampler, L, n_new, a.grow),
                               expansion_sources(n_old, n_new, a.grow))
    offsets = grow_step_offsets(runtime.step_offsets, n_old, n_new, a.grow,
                                a.optimizer_state, step)
    noise = None
    if a.growth_noise > 0:
        layout = runtime.tp_layout()
        noise = GrowthNoise(a.growth_noise, cfg.train.seed, new_stage, std={},
                            layout=layout, tp=runtime.dist.tp, tp_rank=runtime.dist.tp_rank)
    source = runtime.shard_source()
    rules = expansion_rules(source.names, n_old, n_new, a.grow, a.optimizer_state, scales)
    runtime.destroy()
    faults.sleep("expand", f"{n_old} -> {n_new}")   # test-only (kill -9 trials)
    runtime.build(n_new, step_offsets=offsets)
    runtime.prime()
    held = dict(runtime.named_parameters())
    missing = set(held) - {r.name for r in rules}
    if missing:
        raise RuntimeError(f"the grown model has parameters no expansion rule makes: "
                           f"{sorted(missing)[:5]}")
    for rule in rules:
        _transfer(runtime, source, rule, held.get(rule.name), noise)
    set_step_counts(runtime.engine, step)
    source.drop()


def _transfer(runtime, source: ShardSource, rule, p, noise) -> None:
    """One new parameter: gather its sources, apply the rule, write it where it is held."""
    src = source.gather(rule.source)
    gathered = [src]
    moments = src
    if rule.moments is None:
        moments = None
    elif rule.moments != rule.source:
        moments = source.gather(rule.moments, MOMENTS)
        gathered.append(moments)
    if noise is not None and rule.noise and rule.source not in noise.std:
        # std of the FULL tensor (collective over the TP group, same order on every rank)
        noise.std.update(runtime.full_tensor_std({rule.source: src}, [rule.source],
                                                 noise.layout))
    entry = apply_rule(rule, src["param"], moments, noise)
    if p is not None:
        write_entry(runtime.engine, p, entry)
    del entry, moments
    for g in gathered:
        source.release(g)
