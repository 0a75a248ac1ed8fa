"""The runtime side of an Apollo expansion: gather what the pure transform in
apollo/expand.py needs (moment scales from the exact depth pmf, the full-tensor std and
tensor-parallel layout for growth noise, the pool layers' Adam step offsets) and call it."""
from __future__ import annotations

from apollo_ds.apollo.expand import (GrowthNoise, grow_state, grow_step_offsets,
                                     moment_scales)
from apollo_ds.apollo.layer_maps import expansion_sources
from apollo_ds.apollo.samplers import expected_uses


def grow(runtime, cfg, state: dict, n_old: int, n_new: int, step: int, new_stage: int
         ) -> tuple[dict, list[int]]:
    """(grown full state, grown per-layer Adam step offsets) for an expansion after global
    step ``step`` into stage ``new_stage``. Call before the old engine is destroyed (the
    noise layout is read from its parameters); collective when growth noise is on under TP."""
    a, L = cfg.apollo, cfg.model.layers
    sampler = a.sampler if a.enabled else "constant_high"
    scales = None
    if a.optimizer_state == "copy_scaled":
        scales = moment_scales(expected_uses(sampler, L, n_old, a.grow),
                               expected_uses(sampler, L, n_new, a.grow),
                               expansion_sources(n_old, n_new, a.grow))
    noise = None
    if a.growth_noise > 0:
        layout = runtime.tp_layout()
        noise = GrowthNoise(a.growth_noise, cfg.train.seed, new_stage,
                            std=runtime.full_tensor_std(state, state, layout), layout=layout,
                            tp=runtime.dist.tp, tp_rank=runtime.dist.tp_rank)
    offsets = grow_step_offsets(runtime.step_offsets, n_old, n_new, a.grow,
                                a.optimizer_state, step)
    return grow_state(state, n_old, n_new, a.grow, a.optimizer_state, scales, noise), offsets
