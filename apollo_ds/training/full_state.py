"""Full, unsharded fp32 weights of a running model: ZeRO-3 partitions gathered, tensor-parallel
shards concatenated along their partition dimension, vocabulary padding dropped. Collective:
every rank calls it; every rank gets the result."""
from __future__ import annotations

import deepspeed
import torch
from megatron.core import parallel_state

from apollo_ds.distributed import all_gather_tensor
from apollo_ds.model.gpt import is_vocab_rows


@torch.no_grad()
def full_state_dict(model, vocab_size: int) -> dict[str, torch.Tensor]:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        zero3 = hasattr(p, "ds_id")
        with deepspeed.zero.GatheredParameters([p], enabled=zero3):
            t = p.detach().float().cpu().clone()
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            # gathered on the group's device (NCCL refuses CPU tensors), returned on the CPU
            t = torch.cat(all_gather_tensor(t, group=group), dim=p.partition_dim)
        if is_vocab_rows(name, p):
            t = t[:vocab_size].clone()
        out[name] = t
    return out
