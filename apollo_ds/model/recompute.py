"""Activation recompute (``train.recompute``): ``full`` re-runs each transformer layer in
backward, ``selective`` only the attention core (softmax(QK^T)V with its dropout), as in
Megatron: it frees the s x s probabilities and dropout mask where the attention kernel keeps
them (SDPA's math path, e.g. attention dropout on CPU); fused flash kernels keep only their
output and log-sum-exp, so there selective frees little and ``full`` is the lever.

Why not megatron-core's ``tensor_parallel.checkpoint``: it is a reentrant autograd Function,
so each checkpointed use of a layer runs its own inner backward, and a pool layer that runs
several times in one micro-batch (Apollo's layer maps) fires its parameters' gradient hooks
once per use. DeepSpeed's ZeRO-2/3 reduce a parameter's gradient from that hook and refuse a
second one ("has already been reduced"). torch's non-reentrant checkpoint keeps the original
graph and only refills the saved activations, so the uses of a parameter are summed before
its hook fires once, exactly as without recompute.

torch's checkpoint restores the default generator (and the CUDA one of the inputs' devices)
before recomputing; the dropout on a rank's own attention heads draws from megatron-core's
model-parallel RNG tracker instead, whose states it does not know. ``_tracker_contexts``
snapshots them when the forward enters the checkpoint and puts them back around the
recomputation, so the recomputed masks are the forward's on both streams.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from megatron.core import tensor_parallel
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from apollo_ds.config import RECOMPUTE

MODES = RECOMPUTE   # none | selective | full


def mode_of(recompute) -> str:
    """A mode name; ``True``/``False`` (the older boolean switch) mean full/none."""
    if recompute is True:
        return "full"
    if recompute in (False, None):
        return "none"
    if recompute not in MODES:
        raise ValueError(f"recompute={recompute!r}: choose one of {', '.join(MODES)}")
    return recompute


def _tracker_contexts():
    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved: dict = {}

    @contextmanager
    def forward():
        # clones: the tracker replaces its states as it forks, but never aliasing is assumed
        saved.update({k: v.clone() for k, v in tracker.get_states().items()})
        yield

    @contextmanager
    def recompute():
        now = tracker.get_states()
        tracker.set_states(dict(saved))
        try:
            yield
        finally:
            tracker.set_states(now)

    return forward(), recompute()


@torch.compiler.disable
def checkpoint(fn, *args):
    """``fn(*args)`` whose activations are rebuilt in backward (non-reentrant; both RNG
    streams replayed). Outside autograd (evaluation, no_grad) it is a plain call.

    Never traced by torch.compile (train.compile): inside a compiled block (selective) the
    core runs eagerly at a graph break, since the RNG tracker's state swaps cannot be traced;
    a compiled block called from here (full) is still compiled."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return torch_checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                            context_fn=_tracker_contexts)
