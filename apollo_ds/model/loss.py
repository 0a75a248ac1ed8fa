"""Vocab-parallel cross entropy that never holds an fp32 copy of the full logits.

The logits of a 124M GPT-2 step (8 x 1024 tokens x 50304) are 0.8 GB in bf16; an fp32 copy
and the several elementwise passes of a plain cross entropy over it cost more memory traffic
than the LM head itself. Here the logits stay in their own dtype and every pass works on a
chunk of tokens converted to fp32 on the fly: the forward saves one fp32 log-sum-exp per
token, the backward rebuilds softmax - onehot chunk by chunk straight into the gradient
buffer. Under tensor parallelism each rank holds a vocabulary slice: the max, the sum of
exponentials and the target logit are all-reduced over the TP group (one all-reduce each for
all tokens, as megatron-core's vocab_parallel_cross_entropy does).
"""
from __future__ import annotations

import torch
import torch.distributed as tdist

# fp32 elements per chunk (64 Mi = 256 MiB): large enough that the per-chunk overhead is
# negligible, small enough to stay well below the logits' own size at the GPT-2 shape.
CHUNK_ELEMENTS = 1 << 26


def _tp():
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _chunks(n_tokens: int, vocab: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, vocab))
    for lo in range(0, n_tokens, step):
        yield lo, min(n_tokens, lo + step)


class _ChunkedVocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, pad_mask, chunk_elements):
        group, rank, world = _tp()
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        tgt = labels.reshape(-1)
        n = flat.shape[0]
        local = tgt - rank * v
        in_range = (local >= 0) & (local < v)
        local = torch.where(in_range, local, torch.zeros_like(local))

        def chunk(lo, hi):
            x = flat[lo:hi].float()
            if pad_mask is not None:
                x = x.masked_fill(pad_mask, float("-inf"))
            return x

        mx = torch.empty(n, dtype=torch.float32, device=flat.device)
        picked = torch.empty(n, dtype=torch.float32, device=flat.device)
        for lo, hi in _chunks(n, v, chunk_elements):
            x = chunk(lo, hi)
            mx[lo:hi] = x.max(dim=-1).values
            picked[lo:hi] = x.gather(1, local[lo:hi, None]).squeeze(1)
        picked = torch.where(in_range, picked, torch.zeros_like(picked))
        if world > 1:
            tdist.all_reduce(mx, op=tdist.ReduceOp.MAX, group=group)
            tdist.all_reduce(picked, group=group)
        sumexp = torch.empty_like(mx)
        for lo, hi in _chunks(n, v, chunk_elements):
            sumexp[lo:hi] = (chunk(lo, hi) - mx[lo:hi, None]).exp().sum(dim=-1)
        if world > 1:
            tdist.all_reduce(sumexp, group=group)
        lse = sumexp.log() + mx
        ctx.save_for_backward(logits, local, in_range, lse, pad_mask)
        ctx.chunk_elements = chunk_elements
        ctx.has_pad = pad_mask is not None
        return (lse - picked).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, in_range, lse, pad_mask = ctx.saved_tensors
        v = logits.shape[-1]
        flat = logits.reshape(-1, v)
        g = grad_out.reshape(-1).float()
        grad = torch.empty_like(flat)
        for lo, hi in _chunks(flat.shape[0], v, ctx.chunk_elements):
            x = flat[lo:hi].float()
            if ctx.has_pad:
                x = x.masked_fill(pad_mask, float("-inf"))
            p = (x - lse[lo:hi, None]).exp()
            p.scatter_add_(1, local[lo:hi, None], -in_range[lo:hi, None].float())
            grad[lo:hi] = (p * g[lo:hi, None]).to(grad.dtype)
        return grad.view(logits.shape), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 pad_mask: torch.Tensor | None = None,
                                 chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Per-token loss (fp32, labels' shape) of this TP rank's vocabulary slice ``logits``
    [..., V/tp] against global ``labels``; ``pad_mask`` [V/tp] (True: a padded vocabulary row,
    never probable) is applied chunk by chunk instead of on a full copy."""
    return _ChunkedVocabParallelCE.apply(logits, labels, pad_mask, chunk_elements)
