"""Full optimizer state of a DeepSpeed engine by canonical parameter name, whatever ZeRO stage
or precision partitioned it: read (``read_state``) and written back (``write_state``) as full
fp32 CPU tensors, plus the lr=0 priming step that a freshly built engine needs before its Adam
state can be written (README, "How Apollo runs here": expansion).

- ZeRO 1-3 and bf16 (DeepSpeed's BF16_Optimizer at ZeRO 0 included): ``safe_get_full_*`` /
  ``safe_set_full_*`` through each parameter's hp mapping (collective);
- fp32 ZeRO 0: the module parameter is the master, and the torch optimizer's state is keyed
  by it.
Under TP each rank reads and writes its own shard; under PP each stage its own parameters.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

MOMENTS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _uses_hp_mapping(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def state_slots(engine):
    """(parameter group, Adam state slot) for every state slot of the engine's optimizer: one
    per flat partition and group under ZeRO 1-3 and bf16, one per parameter at fp32 ZeRO 0.
    ZeRO-3 empties its groups' ``params`` between steps and keeps the flat fp32 partitions
    (``fp32_partitioned_groups_flat``, mapped to groups by ``sub_group_to_group_id``)."""
    opt, inner = engine.optimizer, inner_optimizer(engine)
    groups = inner.param_groups
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        pairs = [(groups[opt.sub_group_to_group_id[i]], flat)
                 for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
    else:
        pairs = [(g, p) for g in groups for p in g["params"]]
    for g, p in pairs:
        slot = inner.state.get(p)
        if slot and "step" in slot:
            yield g, slot


def optimizer_step_count(engine) -> int:
    """The global optimizer step: a slot's Adam step plus its group's step offset."""
    for g, slot in state_slots(engine):
        return int(slot["step"]) + int(g.get("step_offset", 0))
    return 0


def group_step_counts(engine) -> list[tuple[list[int], int, int]]:
    """(pool layers, step offset, Adam step) of every state slot (for tests and logs)."""
    return [(list(g.get("pool_layers", [])), int(g.get("step_offset", 0)), int(slot["step"]))
            for g, slot in state_slots(engine)]


def relink_optimizer_state(engine) -> None:
    """DeepSpeed 0.19.8 ZeRO 1/2 links parameters to their Adam state fragments once, at the end
    of the first group's step, so with several parameter groups (decay / no decay) every later
    group is linked to an empty state and ``safe_*_optimizer_state`` fails for it. Link again
    now that every group has stepped."""
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def read_entry(engine, p) -> dict[str, torch.Tensor | None]:
    """{"param", "exp_avg", "exp_avg_sq"} of one parameter as full (ZeRO-gathered) fp32 CPU
    tensors; a moment an optimizer has not created yet is None. Collective over the data-
    parallel group under ZeRO 1-3 / bf16: every rank calls it for the same parameters in the
    same order. Call ``relink_optimizer_state`` once first."""
    if _uses_hp_mapping(p):
        entry = {"param": safe_get_full_fp32_param(p)}
        for key in MOMENTS:
            entry[key] = safe_get_full_optimizer_state(p, key)
    else:  # ZeRO 0, fp32: the module parameter is the master; the state is keyed by it
        state = engine.optimizer.state.get(p, {})
        entry = {"param": p.detach()}
        for key in MOMENTS:
            entry[key] = state.get(key)
    return {k: (v.detach().float().cpu().clone() if v is not None else None)
            for k, v in entry.items()}


def read_state(engine, named_parameters) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"param", "exp_avg", "exp_avg_sq"} as full fp32 CPU tensors (collective)."""
    relink_optimizer_state(engine)
    return {name: read_entry(engine, p) for name, p in named_parameters}


def _write_zero3_partition(p, param: torch.Tensor) -> None:
    """A ZeRO-3 module parameter from its full value (which every rank has): this rank's
    partition (``ds_tensor``, padded at the end) and, where the parameter is resident whole
    (persistent small parameters), the whole; no collective."""
    flat = param.reshape(-1)
    part = p.ds_tensor.data.reshape(-1)
    start = torch.distributed.get_rank(group=p.ds_process_group) * part.numel()
    n = max(0, min(part.numel(), p.ds_numel - start))
    part[:n].copy_(flat[start:start + n].to(part.device, part.dtype))
    if p.data.numel() == p.ds_numel:
        p.data.copy_(param.reshape(p.data.shape).to(p.device, p.dtype))


def write_entry(engine, p, values: dict) -> None:
    """Write one parameter's full (tensor-parallel shard) fp32 ``values`` ({"param",
    "exp_avg", "exp_avg_sq"}; a missing or None moment is zero) into the engine: the module
    (low-precision) weights, the fp32 master and the Adam moments; each rank keeps its own
    part (no collective)."""
    param = values["param"]
    moments = {k: values[k] if values.get(k) is not None else torch.zeros_like(param)
               for k in MOMENTS}
    with torch.no_grad():
        if hasattr(p, "ds_id"):
            _write_zero3_partition(p, param)
        elif _uses_hp_mapping(p):
            p.data.copy_(param.reshape(p.shape).to(p.device, p.dtype))
        if _uses_hp_mapping(p):
            safe_set_full_fp32_param(p, param.to(p.device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, moments[key].to(p.device), key)
        else:   # ZeRO 0, fp32: the module parameter is the master
            p.copy_(param.reshape(p.shape).to(p.device, p.dtype))
            slot = engine.optimizer.state[p]
            for key in MOMENTS:
                slot[key].copy_(moments[key].reshape(slot[key].shape).to(slot[key].device))


def set_step_counts(engine, step: int) -> None:
    """Adam's bias correction continues from ``step`` minus each parameter group's
    ``step_offset`` (a pool layer's own Adam step count): one counter per flat group (ZeRO)
    or per parameter (ZeRO 0)."""
    for g, slot in state_slots(engine):
        own = step - int(g.get("step_offset", 0))
        if own < 0:
            raise ValueError(f"step offset {g.get('step_offset')} is beyond step {step}")
        if torch.is_tensor(slot["step"]):
            slot["step"].fill_(own)
        else:
            slot["step"] = own


def write_state(engine, named_parameters, state, step: int) -> None:
    """Write ``state[name]`` (full fp32 masters and moments, read one name at a time, so a
    lazy Mapping keeps one parameter in memory) into a primed engine, then the step counts."""
    for name, p in named_parameters:
        write_entry(engine, p, state[name])
    set_step_counts(engine, step)


@contextmanager
def priming(engine):
    """Around one optimizer step on zero gradients with lr 0: it creates the Adam state (and
    ZeRO's fragment links) without moving a weight (AdamW with lr 0 multiplies by 1 and adds
    0), and leaves the engine's step and sample counters where a fresh engine has them."""
    saved = [g["lr"] for g in engine.optimizer.param_groups]
    for g in engine.optimizer.param_groups:
        g["lr"] = 0.0
    try:
        yield
    finally:
        engine.micro_steps = 0
        engine.global_steps = 0
        engine.global_samples = 0
        for g, lr in zip(engine.optimizer.param_groups, saved):
            g["lr"] = lr
    relink_optimizer_state(engine)
