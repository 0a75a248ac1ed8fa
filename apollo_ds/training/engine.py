"""DeepSpeed engine construction: the JSON config completed from the run config, optimizer
parameter groups, and the learning-rate schedule (set by hand each step so that an engine
rebuilt at an Apollo expansion carries on at the same point)."""
from __future__ import annotations

import json
import math

import torch

from apollo_ds.apollo.samplers import expected_depth
from apollo_ds.config import (ConfigError, RunConfig, stage_end_steps, warmup_steps,
                              wsd_decay_start)
from apollo_ds.value_checks import check_ds_json


def load_ds_config(cfg: RunConfig, dp: int) -> dict:
    path, t = cfg.train.deepspeed_config, cfg.train
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError:
        raise ConfigError(f"DeepSpeed config not found: {path} (shipped ones are in "
                          f"ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    check_ds_json(ds, path)   # types, DeepSpeed's own key/range rules, unused sections
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    if cfg.parallel.pp > 1 and stage >= 2:
        raise ConfigError(f"{path}: ZeRO stage {stage} cannot be combined with pipeline "
                          f"parallelism (parallel.pp={cfg.parallel.pp}); use ZeRO 0 or 1")
    if t.compile and stage == 3:
        # ZeRO-3 gathers each block's parameters in module hooks that would run inside the
        # compiled block
        raise ConfigError(f"{path}: train.compile=true is not supported with ZeRO stage 3; use "
                          f"ZeRO 1 or 2 (ds_configs/zero2_bf16.json) or train.compile=false")
    if ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported; use bf16 (ds_configs/*_bf16.json) "
                          f"or fp32")
    if ds.get("bf16", {}).get("enabled"):
        if stage == 0:
            # DeepSpeed has no fp32 gradient accumulation at ZeRO 0 with bf16, and its bf16
            # wrapper there keeps no fp32-master mapping, so Apollo expansion cannot carry state.
            raise ConfigError(f"{path}: bf16 needs ZeRO stage >= 1 (zero_optimization.stage=0 "
                              f"with bf16 accumulates gradients in bf16 and cannot carry "
                              f"optimizer state across an expansion); use "
                              f"ds_configs/zero1_bf16.json")
        # A pool layer's gradient sums up to L uses per micro-batch and grad_accum
        # micro-batches: accumulate and all-reduce it in fp32.
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
        ds.setdefault("communication_data_type", "fp32")
        for key, val in (("data_types.grad_accum_dtype", ds["data_types"]["grad_accum_dtype"]),
                         ("communication_data_type", ds["communication_data_type"])):
            if str(val).lower() not in ("fp32", "float32", "float", "torch.float32"):
                raise ConfigError(f"{path}: {key}={val!r} with bf16; pool-layer gradients need "
                                  f"fp32 accumulation and reduction: set it to \"fp32\"")
    # Batch sizes come from the run config only, so the two files can never disagree.
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch
    ds["gradient_accumulation_steps"] = t.global_batch // (t.micro_batch * dp)
    ds["train_batch_size"] = t.global_batch
    ds["gradient_clipping"] = t.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    if stage == 1:
        # ZeRO-1 keeps every gradient whole until the boundary's reduction: copying each one
        # into a contiguous bucket as it is produced (DeepSpeed's default) only adds a copy
        # and a per-parameter hook path (bit-identical results; 27 ms of a 1.07 s CPU step
        # on the 4.3 M-parameter throughput benchmark)
        ds["zero_optimization"].setdefault("contiguous_gradients", False)
    # DeepSpeed's throughput timer is on unless configured off, and synchronizes the device
    # twice per micro-batch; the loop times steps itself (one host sync per step).
    ds.setdefault("timers", {}).setdefault("throughput", {"enabled": False, "synchronized": False})
    if t.optimizer == "torch_adam":
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
            "weight_decay": t.weight_decay, "torch_adam": True}}
    else:
        ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(ds: dict) -> torch.dtype:
    return torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32


def param_groups(named_parameters, weight_decay: float, step_offsets=None,
                 pool_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups keyed by (Adam step offset, lr multiplier, decay): decay for matrices
    (and embeddings), never for biases or norms. Pool layer i's parameters carry
    ``step_offsets[i]`` (its Adam step = global step - offset; ZeRO keeps one step counter per
    flat group, so a layer with its own count needs its own group) and ``pool_lr_scale``; every
    other parameter has offset 0 and multiplier 1. Groups with equal keys merge, so a run with
    no offsets and no scaling has today's two groups, decay first. Each group records
    ``step_offset``, ``lr_scale`` and ``pool_layers`` (the pool indices it holds); the order is
    a function of the keys only, so a resumed run rebuilds the same groups."""
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    groups: dict[tuple, dict] = {}
    seen = set()
    for name, p in named_parameters:
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        layer = int(parts[1]) if parts[0] == "pool" else None
        offset = int(step_offsets[layer]) if (layer is not None and step_offsets) else 0
        scale = float(pool_lr_scale) if layer is not None else 1.0
        # ZeRO-3 under zero.Init leaves a partitioned parameter's data empty (1-D): its
        # shape is ds_shape
        decay = len(getattr(p, "ds_shape", p.shape)) >= 2
        g = groups.setdefault((offset, -scale, not decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "step_offset": offset, "lr_scale": scale, "pool_layers": []})
        g["params"].append(p)
        if layer is not None and layer not in g["pool_layers"]:
            g["pool_layers"].append(layer)
    return [groups[k] for k in sorted(groups)]


def pool_lr_scale(cfg: RunConfig, n_unique: int) -> float:
    """``apollo.update_scale``: the lr multiplier of pool-layer parameters in a stage with
    ``n_unique`` unique layers. inv_uses: 1/k with k = E[d]/N, the mean number of positions a
    pool layer runs per micro-batch (exact depth pmf); 1 in the last stage (N = L)."""
    a, m = cfg.apollo, cfg.model
    if a.update_scale == "none" or not a.enabled or n_unique >= m.layers:
        return 1.0
    return n_unique / expected_depth(a.sampler, m.layers, n_unique)


def adamw(groups, t) -> torch.optim.AdamW:
    """torch's fused AdamW (one kernel over all tensors, no temporaries) on CUDA and CPU
    alike: on CPU the per-tensor AdamW allocates several parameter-sized temporaries per
    step (measured on a 4.3 M flat ZeRO group: 27 ms a step against 3 ms fused)."""
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def build_engine(model: torch.nn.Module, ds: dict, cfg: RunConfig, mpu, dist,
                 groups: list[dict] | None = None):
    """A DeepSpeed engine around ``model`` (PoolGPT or a PipelineModule; ``mpu=None`` for the
    latter, whose grid is its own mpu) on ``dist.device``; ``groups`` from ``param_groups``
    (default: by the model's own names, no offsets, no scaling)."""
    import argparse

    import deepspeed
    t = cfg.train
    if groups is None:
        groups = param_groups(model, t.weight_decay)
    if dist.on_cuda:
        # TF32 tensor cores for fp32 matmuls and convolutions (fp32 configs; no effect on bf16)
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    if t.compile:
        from apollo_ds.model.compile import compile_blocks
        from apollo_ds.model.gpt import Block
        from apollo_ds.model.llama import LlamaBlock
        compile_blocks(model, (Block, LlamaBlock), tp=cfg.parallel.tp)
    optimizer = None
    if "optimizer" not in ds:
        optimizer = adamw(groups, t)
    if zero_stage(ds) == 3:
        # The tied LM head reads the embedding weight outside the embedding's own forward.
        deepspeed.zero.register_external_parameter(model, model.word_embeddings.weight)
    # device_rank: the device distributed.init chose for this rank (DeepSpeed would otherwise
    # bind cuda:LOCAL_RANK, which does not exist with one visible GPU per task).
    args = argparse.Namespace(device_rank=dist.device.index or 0)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=groups,
                                           optimizer=optimizer, config=ds, mpu=mpu)
    return engine


def lr_at(step: int, cfg: RunConfig) -> float:
    """The learning rate of optimizer step ``step`` (1-based), a pure function of (step, cfg);
    one global schedule for every Apollo stage, never reset at an expansion.

    Linear warmup over train.warmup steps, then
      cosine: cosine decay to train.min_lr at train.steps;
      wsd:    constant train.lr until ``wsd_decay_start``, then linear decay to train.min_lr at
              train.steps (the decay phase follows the last expansion; config.validate);
    after the last expansion, with train.lr_after_growth = m, min_lr + m * (that - min_lr): a
    higher (m > 1) peak for the grown model that still ends at min_lr;
    times, for the train.rewarmup_steps = K steps after each expansion at step e, the linear
    re-warmup factor (step - e) / K (1/K on the first step of the new stage, 1 from e + K)."""
    t = cfg.train
    warm = warmup_steps(cfg)
    if warm > 0 and step <= warm:
        lr = t.lr * step / warm
    elif t.lr_schedule == "wsd":
        start = wsd_decay_start(cfg)
        if step <= start:
            lr = t.lr
        else:
            progress = min(1.0, (step - start) / max(1, t.steps - start))
            lr = t.lr - (t.lr - t.min_lr) * progress
    else:
        span = max(1, t.steps - warm)
        progress = min(1.0, (step - warm) / span)
        lr = t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))
    expansions = stage_end_steps(cfg)[:-1] if cfg.apollo.enabled else []
    if t.lr_after_growth != 1.0 and expansions and step > expansions[-1]:
        lr = t.min_lr + t.lr_after_growth * (lr - t.min_lr)
    k = t.rewarmup_steps
    if k > 0:
        for e in expansions:
            if e < step < e + k:
                lr *= (step - e) / k
    return lr


def set_lr(engine, lr: float) -> None:
    """Every group's lr: the schedule's value times the group's ``lr_scale`` (pool layers
    under apollo.update_scale; 1 elsewhere)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
