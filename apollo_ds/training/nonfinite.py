"""Non-finite loss or gradients, caught BEFORE the optimizer step (train.on_nonfinite).

``install(engine, runtime)`` wraps the engine's ``_take_model_step`` (instance attribute; both
DeepSpeedEngine.step at the accumulation boundary and PipelineEngine's OptimizerStep
instruction call it once per optimizer step, after every micro-batch's backward and the
gradient reduction, before clipping and the optimizer). There the runtime's guard (the
Trainer's) gets this rank's loss share and the pre-step gradient norm, makes the step's one
host sync (an all-reduce over every rank, so all ranks take the same decision) and answers
step or skip. A skip still runs DeepSpeed's own step bookkeeping (gradients freed, low-precision
copies refreshed from the unchanged masters) but with the inner torch optimizer's ``step``
disabled: no weight, moment or Adam step count changes."""
from __future__ import annotations

from contextlib import contextmanager

import torch

EXIT_NONFINITE = 3   # pretrain.py's exit code when train.on_nonfinite stops a run


class NonFiniteError(RuntimeError):
    """A non-finite step under train.on_nonfinite=stop, or more than train.max_skipped
    consecutive ones under skip; the message names the step, depths and samples."""


def pre_step_grad_norm(engine) -> tuple[torch.Tensor, bool]:
    """(norm, is_global) before the optimizer step. ZeRO 1-3 and bf16: the global 2-norm
    exactly as the engine's optimizer computes it in its step (the same DeepSpeed function on
    the same reduced gradients: identical on every rank; inf when any gradient is non-finite,
    which DeepSpeed reports as -1 or inf).
    fp32 ZeRO 0 (no wrapper, no norm of DeepSpeed's own): the sum of this rank's squared
    gradient norms, a finiteness probe only (is_global False)."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    opt = engine.optimizer
    norm = None
    if isinstance(opt, DeepSpeedZeroOptimizer):
        norm = opt.scaled_global_norm() / opt.loss_scale
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        norm = combine_grad_norm_groups(opt._get_norm_groups()) / opt.loss_scale
    elif isinstance(opt, BF16_Optimizer):
        grads, _expert = opt.get_grads_for_norm()
        norm = torch.as_tensor(get_global_norm_of_tensors(input_tensors=grads, mpu=opt.mpu,
                                                          norm_type=opt.norm_type))
    if norm is not None:
        # DeepSpeed's helpers mask a non-finite norm to -1 (is_invalid_grad_norm): inf here
        norm = norm.float()
        return torch.where(norm < 0, torch.full_like(norm, float("inf")), norm), True
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32), False
    norms = torch._foreach_norm(grads)
    return torch.stack([n.float() for n in norms]).pow(2).sum(), False


@contextmanager
def optimizer_disabled(engine):
    """The inner torch optimizer's ``step`` is a no-op inside (instance attribute)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    own = inner.__dict__.get("step")   # an instance-level step (a wrapper's) is put back
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del inner.step
        else:
            inner.step = own


def install(engine, runtime) -> None:
    """Route ``engine``'s optimizer step through ``runtime.step_guard`` (see module doc).
    Without a guard (the priming step of a rebuilt engine, library callers) it steps as
    DeepSpeed would."""
    take = engine._take_model_step

    def guarded_take_model_step(lr_kwargs=None):
        guard, runtime.step_guard = runtime.step_guard, None
        if guard is None:
            return take(lr_kwargs)
        norm, is_global = pre_step_grad_norm(engine)
        if guard(runtime.step_loss_share(), norm, is_global):
            return take(lr_kwargs)
        with optimizer_disabled(engine):
            return take(lr_kwargs)

    engine._take_model_step = guarded_take_model_step
