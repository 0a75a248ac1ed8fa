"""DeepSpeed engine construction: the JSON config completed from the run config, optimizer
parameter groups, and the learning-rate schedule (set by hand each step so that an engine
rebuilt at an Apollo expansion carries on at the same point)."""
from __future__ import annotations

import json
import math

import torch

from apollo_ds.config import ConfigError, RunConfig


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
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    if cfg.parallel.pp > 1 and stage >= 2:
        raise ConfigError(f"{path}: ZeRO stage {stage} cannot be combined with pipeline "
                          f"parallelism (parallel.pp={cfg.parallel.pp}); use ZeRO 0 or 1")
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and embeddings); never biases or norms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model: torch.nn.Module, ds: dict, cfg: RunConfig, mpu, dist):
    """A DeepSpeed engine around ``model`` (PoolGPT or a PipelineModule; ``mpu=None`` for the
    latter, whose grid is its own mpu) on ``dist.device``."""
    import argparse

    import deepspeed
    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    optimizer = None
    if "optimizer" not in ds:
        # The fused (multi-tensor, single-kernel) AdamW on CUDA; the same math on CPU.
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                                      fused=dist.on_cuda)
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
    """Cosine decay with linear warmup over optimizer steps 1..train.steps; one global
    schedule for every Apollo stage."""
    t = cfg.train
    warm = t.warmup if t.warmup >= 1 else round(t.warmup * t.steps)
    if warm > 0 and step <= warm:
        return t.lr * step / warm
    span = max(1, t.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
