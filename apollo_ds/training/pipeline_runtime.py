"""The Runtime for parallel.pp > 1: PipeGPT (apollo_ds.model.pipeline) under DeepSpeed's
PipelineEngine, ZeRO 0/1. Full state is read and written per stage by PoolGPT name and
exchanged over the pipeline group, because a new replica's source may live on another stage.
"""
from __future__ import annotations

import torch
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state

from apollo_ds.distributed import all_reduce
from apollo_ds.model.init import init_weights
from apollo_ds.model.pipeline import Canonical, PipeGPT
from apollo_ds.training import faults
from apollo_ds.training.engine import build_engine
from apollo_ds.training.runtime import Runtime


def check_topology(model: PipeGPT) -> None:
    """Megatron's rank order (tp fastest, then dp, then pp) must equal DeepSpeed's
    PipeModelDataParallelTopology (axes pipe, data, model; model fastest). Checked on every
    rank, so the whole mapping is checked."""
    g = model._grid
    mine = (g.get_stage_id(), g.get_data_parallel_rank(), g.get_slice_parallel_rank())
    ps = parallel_state
    theirs = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
              ps.get_tensor_model_parallel_rank())
    if mine != theirs:
        raise RuntimeError(f"rank {torch.distributed.get_rank()}: DeepSpeed pipeline topology "
                           f"(pipe, data, model)={mine} differs from megatron-core's {theirs}")


@torch.no_grad()
def clip_pipe_grad_norm_(model: PipeGPT, max_norm: float) -> torch.Tensor:
    """DeepSpeed's clip_grad_norm_ (2-norm) with each parameter counted once: tied replicas
    only on their first owner (``ds_pipe_replicated``), tensor-parallel-duplicated ones only on
    TP rank 0; squared norms summed over the pipeline x tensor group of this DP replica. All on
    the gradients' device: no host sync."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    params = [p for p in model.parameters() if p.grad is not None]
    dev = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float32, device=dev)
    for p in params:
        if not getattr(p, "ds_pipe_replicated", False) and (
                tp_rank == 0 or getattr(p, "tensor_model_parallel", False)):
            sq += p.grad.detach().float().pow(2).sum()
    total = all_reduce(sq.reshape(1), group=model._grid.get_model_parallel_group(),
                       dtype=torch.float32).to(dev).sqrt()
    clip_coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.detach().mul_(clip_coef.to(p.grad.dtype))
    return total


class PipelineRuntime(Runtime):
    def _topology(self):
        d = self.dist
        return PipeModelDataParallelTopology(num_pp=d.pp, num_mp=d.tp, num_dp=d.dp)

    def new_model(self, n_unique: int) -> PipeGPT:
        m = self.cfg.model
        model = PipeGPT(m, n_unique, self._topology(), self.cfg.apollo.grow,
                        recompute=self.recompute)
        init_weights(Canonical(model), self.cfg.train.seed, m.init_std, m.layers, m.vocab_size)
        return model

    def canonical(self, model):
        return Canonical(model).named_parameters()

    def _make_engine(self, model):
        check_topology(model)
        # mpu=None: the PipelineModule's own grid (pipe, data, model) is the mpu, as in
        # Megatron-DeepSpeed.
        engine = build_engine(model, self.ds_config, self.cfg, None, self.dist,
                              groups=self.param_groups(model))
        # ZeRO-0 fp32 clips with deepspeed.runtime.utils.clip_grad_norm_, which under a
        # pipeline grid counts tied replicas on every owner and drops the non-tensor-parallel
        # parameters of every stage but the first (it tests grid.get_model_parallel_rank() == 0,
        # a pipe x tensor rank); ZeRO 1 (stage_1_and_2) is correct. Clip with the PP=1 norm.
        engine.clip_fp32_gradients = lambda: clip_pipe_grad_norm_(model,
                                                                  engine.gradient_clipping())
        return engine

    def _train_batch(self, depths: list[int], batches) -> torch.Tensor:
        self.model.set_depths(depths)
        return self.engine.train_batch(batches)

    def _prime_step(self) -> None:
        t = self.cfg.train
        tokens = torch.zeros(t.micro_batch, self.cfg.model.seq_len, dtype=torch.long,
                             device=self.dist.device)
        mask = torch.ones(tokens.shape, dtype=torch.float32, device=self.dist.device)
        self._train_batch([self.model.n_unique] * self.grad_accum,
                          iter([(tokens, (tokens, mask))] * self.grad_accum))

    def run_step(self, step: int, plan, guard=None) -> torch.Tensor:
        def batches():
            for k in range(self.grad_accum):
                b = self.batch(self.train_ds, self.micro_batch_start(step, k))
                yield b["tokens"], (b["labels"], b["loss_mask"])

        loss_fn = self.model.loss_fn
        if faults.ACTIVE:
            self.model.loss_fn = lambda out, labels: faults.loss(loss_fn(out, labels), step)
        self.step_guard = guard
        try:
            # The mean over the micro-batches and the DP ranks, on every stage: each DP rank
            # contributes mean * grad_accum, as the PP=1 runtime's sum over its micro-batches.
            loss = self._train_batch([p[0] for p in plan], batches())
        finally:
            self.step_guard, self.model.loss_fn = None, loss_fn
        return loss.detach().float().reshape(()) * self.grad_accum

    def step_loss_share(self) -> torch.Tensor:
        # Before the optimizer step only the last stage knows the loss (the engine's sum over
        # this step's micro-batches); each of its dp * tp ranks holds its DP replica's.
        e, d = self.engine, self.dist
        if not e.is_last_stage() or e.total_loss is None:
            return torch.zeros((), dtype=torch.float32, device=d.device)
        return e.total_loss.detach().float().reshape(()) / (self.grad_accum * d.dp * d.tp)

    @torch.no_grad()
    def evaluate(self) -> float:
        if self.valid_ds is None:
            return float("nan")
        starts, ga = self.eval_starts(), self.grad_accum
        total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        n = 0
        for c in range(0, len(starts), ga):
            chunk = starts[c:c + ga]

            def batches(chunk=chunk):
                for s in chunk:
                    b = self.batch(self.valid_ds, s)
                    yield b["tokens"], (b["labels"], b["loss_mask"])
            self.model.set_depths([self.cfg.model.layers] * len(chunk))
            # eval_batch: mean over the chunk and the DP ranks, broadcast to every stage
            total += self.engine.eval_batch(batches(), num_micro_batches=len(chunk)).double().reshape(())
            n += 1
        self.engine.train()
        return (total / n).item()

    # ------------------------------------------------------------------ full state
    def full_state(self) -> tuple[dict, int]:
        local, step = super().full_state()
        return merge_first_owner(gather_over_pipe(local)), step

    @torch.no_grad()
    def full_weights(self) -> dict:
        merged, _ = self.full_weights_per_stage()
        return merged

    @torch.no_grad()
    def full_weights_per_stage(self) -> tuple[dict, list[dict]]:
        """(full weights with PoolGPT's names, each pool layer from its first owner stage;
        every stage's own full dict, to check that replicas are identical). Collective."""
        from apollo_ds.training.full_state import full_state_dict
        per_stage = gather_over_pipe(full_state_dict(Canonical(self.model),
                                                     self.cfg.model.vocab_size))
        return merge_first_owner(per_stage), per_stage


def gather_over_pipe(local: dict) -> list[dict]:
    """Every stage's dict (of CPU tensors), in stage order (collective over the pipeline
    group; all_gather_object stages the pickles on the group's device itself)."""
    out = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(out, local,
                                        group=parallel_state.get_pipeline_model_parallel_group())
    return out


def merge_first_owner(per_stage: list[dict]) -> dict:
    merged = {}
    for sd in per_stage:
        for k, v in sd.items():
            merged.setdefault(k, v)
    return merged
