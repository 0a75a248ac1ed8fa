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

import contextlib
from contextlib import contextmanager, nullcontext

import torch

from apollo_ds.distributed import all_reduce

EXIT_NONFINITE = 3   # pretrain.py's exit code when train.on_nonfinite stops a run


class NonFiniteError(RuntimeError):
    """A non-finite step under train.on_nonfinite=stop, or more than train.max_skipped
    consecutive ones under skip; the message names the step, depths and samples."""


def pre_step_grad_norm(engine) -> tuple[torch.Tensor, bool, "Reuse"]:
    """(norm, is_global, reuse) before the optimizer step: the global 2-norm of the reduced
    gradients, identical on every rank, inf when any gradient is non-finite (DeepSpeed's
    helpers report that as -1). ZeRO 1-3 and bf16: DeepSpeed's own function on its own state;
    fp32 ZeRO 0 (no wrapper): ``model_parallel_grad_norm``. Inside ``reuse(finite)`` the
    optimizer step reads this norm instead of computing it again (for the clip)."""
    from deepspeed.runtime import bf16_optimizer
    from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    opt = engine.optimizer
    if isinstance(opt, stage_1_and_2.DeepSpeedZeroOptimizer):
        raw = opt.scaled_global_norm()
        norm = raw / opt.loss_scale
        reuse = Reuse(raw, stage_1_and_2, [(opt, "scaled_global_norm", lambda norm_type=2: raw)])
    elif isinstance(opt, stage3.DeepSpeedZeroOptimizer_Stage3):
        groups = opt._get_norm_groups()
        raw = combine_grad_norm_groups(groups)
        norm = raw / opt.loss_scale
        reuse = Reuse(raw, stage3, [(opt, "_get_norm_groups", lambda: groups),
                                    (stage3, "combine_grad_norm_groups",
                                     lambda g, norm_type=2: raw if g is groups else
                                     combine_grad_norm_groups(g, norm_type))])
    elif isinstance(opt, bf16_optimizer.BF16_Optimizer):
        grads, _expert = opt.get_grads_for_norm()
        raw = get_global_norm_of_tensors(input_tensors=grads, mpu=opt.mpu,
                                         norm_type=opt.norm_type)
        norm = torch.as_tensor(raw)
        # BF16_Optimizer.step calls the module-level function
        reuse = Reuse(raw, bf16_optimizer,
                      [(bf16_optimizer, "get_global_norm_of_tensors", lambda **_kw: raw)])
    else:
        norm = model_parallel_grad_norm(engine.module)
        clip = engine.gradient_clipping()
        reuse = Reuse(norm, None, [(engine, "clip_fp32_gradients",
                                    lambda: clip_grads_(engine.module, norm, clip))])
    norm = norm.float()
    return torch.where(norm < 0, torch.full_like(norm, float("inf")), norm), True, reuse


class Reuse:
    """The optimizer step with the pre-step norm ``raw`` handed in: each (object, attribute,
    value) is swapped in for the step only. ``finite=True`` (the guard's reduction showed the
    norm finite) also answers DeepSpeed's ``is_invalid_grad_norm(raw)`` checks in ``module``
    from that knowledge: each would otherwise read the device (``bool(tensor)``)."""

    def __init__(self, raw, module, patches: list):
        self.raw, self.module, self.patches = raw, module, patches

    @contextmanager
    def __call__(self, finite: bool):
        patches = list(self.patches)
        if finite and self.module is not None:
            check, raw = self.module.is_invalid_grad_norm, self.raw
            patches.append((self.module, "is_invalid_grad_norm",
                            lambda n: False if n is raw else check(n)))
        with contextlib.ExitStack() as stack:
            for obj, name, value in patches:
                stack.enter_context(_patched(obj, name, value))
            yield


@contextmanager
def _patched(obj, name: str, value):
    """``obj.name`` is ``value`` inside (an instance or module attribute, put back after)."""
    missing = object()
    own = obj.__dict__.get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


@torch.no_grad()
def model_parallel_grad_norm(module) -> torch.Tensor:
    """Global 2-norm of ``module``'s gradients (already reduced over data parallelism), each
    parameter counted once: pipeline-tied replicas only on their first owner
    (``ds_pipe_replicated``), tensor-parallel-duplicated ones only on TP rank 0; squared sums
    all-reduced over megatron's model-parallel (tensor x pipeline) group. No host sync on
    NCCL."""
    from megatron.core import parallel_state
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    grads = [p.grad for p in module.parameters() if p.grad is not None
             and not getattr(p, "ds_pipe_replicated", False)
             and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    dev = grads[0].device if grads else next(module.parameters()).device
    sq = torch.zeros(1, dtype=torch.float32, device=dev)
    if grads:
        sq += torch.stack([n.float() for n in torch._foreach_norm(grads)]).pow(2).sum()
    group = parallel_state.get_model_parallel_group()
    return all_reduce(sq, group=group, dtype=torch.float32).to(dev).reshape(()).sqrt()


@torch.no_grad()
def clip_grads_(module, norm: torch.Tensor, max_norm: float) -> None:
    """DeepSpeed's clip rule (scale by max_norm / (norm + 1e-6) when below 1) with a known
    norm, on the device."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if max_norm > 0 and grads:
        coef = (float(max_norm) / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))


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
        norm, is_global, reuse = pre_step_grad_norm(engine)
        # True only when the loss and this norm were both finite on every rank
        step = guard(runtime.step_loss_share(), norm, is_global)
        with reuse(finite=step), (nullcontext() if step else optimizer_disabled(engine)):
            return take(lr_kwargs)

    engine._take_model_step = guarded_take_model_step
