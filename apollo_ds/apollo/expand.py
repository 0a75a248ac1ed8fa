"""ZeRO-aware pool expansion at an Apollo stage boundary (between optimizer steps, all ranks).

1. Read every parameter's full fp32 master value and Adam moments from wherever ZeRO 0/1/2/3
   keeps them (``safe_get_full_*`` for ZeRO 1-3 and bf16; the torch optimizer for ZeRO 0).
   Under TP each rank reads its own shard: interpolation copies layers, never splits them, so
   every copy stays on the same TP rank.
2. Build the larger pool (new layer i from old layer ``expansion_sources[i]``) and a new
   DeepSpeed engine around it: new flat buffers, new DP partitions.
3. Prime the new optimizer with one lr=0 step on zero gradients (a fresh engine has no Adam
   state until its first step, and ZeRO 1/2 link their fp32 fragments lazily in that step),
   then write each parameter's fp32 master, exp_avg, exp_avg_sq and the carried step counter
   into its new partition. The LR schedule is driven by the global step and carries on.
"""
from __future__ import annotations

import gc

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

from apollo_ds.apollo.layer_maps import expansion_sources, layer_map

MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _uses_hp_mapping(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def optimizer_step_count(engine) -> int:
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _relink_optimizer_state(engine) -> None:
    """DeepSpeed 0.19.8 ZeRO 1/2 links parameters to their Adam state fragments once, at the end
    of the first group's step, so with several parameter groups (decay / no decay) every later
    group is linked to an empty state and ``safe_*_optimizer_state`` fails for it. Link again
    now that every group has stepped."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def read_state(engine, model) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"param", "exp_avg", "exp_avg_sq"} as full fp32 CPU tensors (collective)."""
    opt = engine.optimizer
    _relink_optimizer_state(engine)
    out = {}
    for name, p in model.named_parameters():
        if _uses_hp_mapping(p):
            entry = {"param": safe_get_full_fp32_param(p)}
            for key in MOMENTS:
                entry[key] = safe_get_full_optimizer_state(p, key)
        else:  # ZeRO 0, fp32: the module parameter is the master; the state is keyed by it
            state = opt.state.get(p, {})
            entry = {"param": p.detach()}
            for key in MOMENTS:
                entry[key] = state.get(key)
        out[name] = {k: (v.detach().float().cpu().clone() if v is not None else None)
                     for k, v in entry.items()}
    return out


def source_name(name: str, sources: list[int]) -> str:
    """pool.<i>.rest -> pool.<sources[i]>.rest; other names map to themselves."""
    parts = name.split(".")
    if parts[0] == "pool":
        parts[1] = str(sources[int(parts[1])])
    return ".".join(parts)


def _fresh_layers(sources: list[int]) -> set[int]:
    """With optimizer_state=reset, the first copy of every old layer keeps its moments and the
    other copies (the genuinely new layers) start from zero moments."""
    seen, fresh = set(), set()
    for i, s in enumerate(sources):
        (fresh.add(i) if s in seen else seen.add(s))
    return fresh


def _prime(engine, model, n_unique: int, device) -> None:
    """One optimizer step with lr 0 on zero gradients: creates Adam state (and ZeRO's fragment
    links) without moving any weight (AdamW with lr 0 multiplies by 1 and adds 0)."""
    saved = [g["lr"] for g in engine.optimizer.param_groups]
    for g in engine.optimizer.param_groups:
        g["lr"] = 0.0
    tokens = torch.zeros(1, model.cfg.seq_len, dtype=torch.long, device=device)
    engine.set_gradient_accumulation_boundary(True)
    loss = engine(tokens, layer_map(n_unique, n_unique), tokens, None) * 0.0
    engine.backward(loss)
    engine.step()
    engine.set_gradient_accumulation_boundary(None)
    # The priming step must not shift the engine's gradient-accumulation phase.
    engine.micro_steps = 0
    engine.global_steps = 0
    engine.global_samples = 0
    _relink_optimizer_state(engine)
    for g, lr in zip(engine.optimizer.param_groups, saved):
        g["lr"] = lr


def write_state(engine, model, snapshot: dict, sources: list[int], step: int,
                reset_new: bool) -> None:
    fresh = _fresh_layers(sources) if reset_new else set()
    opt = engine.optimizer
    for name, p in model.named_parameters():
        src = snapshot[source_name(name, sources)]
        is_fresh = name.startswith("pool.") and int(name.split(".")[1]) in fresh
        values = {"param": src["param"]}
        for key in MOMENTS:
            m = src[key]
            values[key] = torch.zeros_like(src["param"]) if (is_fresh or m is None) else m
        if _uses_hp_mapping(p):
            safe_set_full_fp32_param(p, values["param"].to(p.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, values[key].to(p.device), key)
        else:
            with torch.no_grad():
                p.copy_(values["param"].to(p.device, p.dtype))
            state = opt.state[p]
            for key in MOMENTS:
                state[key].copy_(values[key].to(state[key].device))
    # Adam's bias correction continues from the carried step (one counter per flat group).
    for state in _inner_optimizer(engine).state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


def expand_engine(trainer, n_new: int):
    """Grow ``trainer``'s pool to ``n_new`` unique layers; returns (model, engine)."""
    cfg = trainer.cfg
    old_model, old_engine = trainer.model, trainer.engine
    n_old = old_model.n_unique
    sources = expansion_sources(n_old, n_new, cfg.apollo.grow)
    snapshot = read_state(old_engine, old_model)
    step = optimizer_step_count(old_engine)
    old_engine.destroy()
    trainer.model = trainer.engine = None
    del old_model, old_engine
    gc.collect()

    model = trainer.new_model(n_new)
    with torch.no_grad():  # module weights first: the engine builds its masters from them
        for name, p in model.named_parameters():
            p.copy_(snapshot[source_name(name, sources)]["param"].to(p.dtype))
    model, engine = trainer.build(n_new, model)
    _prime(engine, model, n_new, trainer.dist.device)
    write_state(engine, model, snapshot, sources, step,
                reset_new=cfg.apollo.optimizer_state == "reset")
    return model, engine
