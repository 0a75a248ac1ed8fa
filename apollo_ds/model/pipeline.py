"""Pipeline parallelism (parallel.pp > 1) through DeepSpeed's PipelineModule / PipelineEngine,
as Megatron-DeepSpeed does; reached only when pp > 1 (PP=1 runs PoolGPT unchanged).

Layer list (design/architecture.md, "The layer pool and the depth plan"):
  stage 0:    EmbedIn (TiedLayerSpec "embed": only the VocabParallelEmbedding), PosEmbed
  stage k:    one replica per pool layer p that stage k can need for some depth d in [N, L]
              (TiedLayerSpec f"pool{p}"), in increasing p
  last stage: FinalNorm, EmbedOut (TiedLayerSpec "embed": the same weight, used as LM head)
The d positions of a micro-batch are split evenly over the S stages: stage k runs positions
[floor(k*d/S), floor((k+1)*d/S)). Position i runs pool layer floor(i*N/d) (interpolate), which is
monotone in i, so a stage runs its replicas in increasing order, each as many times as its
positions map to it. The depth travels with the activations as a one-element int64 tensor.

Replicas of one pool layer on several stages are DeepSpeed tied modules: built identically,
broadcast from the first owner at construction, gradients all-reduced across the owners before
the optimizer step, and (``ds_pipe_replicated``) counted once in the gradient norm. A replica
that gets no position in a micro-batch adds ``0 * sum(params)`` so that every owner always has a
gradient (the tied all-reduce must be called by all owners or by none).

Parameter names: ``canonical_name`` maps the PipelineModule's names (``tied_modules.pool3.qkv.
weight``, ``1.position_embeddings.weight``, ...) to PoolGPT's (``pool.3.qkv.weight``, ...), so
initialisation, expansion and weight gathering reuse the PoolGPT code paths by name.
"""
from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from megatron.core import parallel_state, tensor_parallel
from torch import nn

from apollo_ds.apollo.layer_maps import expansion_sources
from apollo_ds.config import ModelConfig
from apollo_ds.flops import padded_vocab as padded_vocab_size
from apollo_ds.model.gpt import Block, _mark_tp, _mp_config, _no_init
from apollo_ds.model.init import init_weights

BLOCK_PARAMS = ["input_norm.weight", "input_norm.bias", "qkv.weight", "qkv.bias",
                "proj.weight", "proj.bias", "mlp_norm.weight", "mlp_norm.bias",
                "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# ------------------------------------------------------------------ the depth split
def stage_positions(d: int, num_stages: int, stage: int) -> tuple[int, int]:
    """Positions [lo, hi) of a depth-d network that pipeline stage ``stage`` runs."""
    return stage * d // num_stages, (stage + 1) * d // num_stages


def stage_pool_layers(n_unique: int, layers: int, num_stages: int, stage: int) -> list[int]:
    """Pool layers stage ``stage`` can need for some depth d in [n_unique, layers]."""
    need = set()
    for d in range(n_unique, layers + 1):
        lo, hi = stage_positions(d, num_stages, stage)
        need.update(i * n_unique // d for i in range(lo, hi))
    return sorted(need)


def canonical_name(name: str) -> str:
    """PipelineModule parameter name -> PoolGPT parameter name."""
    parts = name.split(".")
    if parts[0] == "tied_modules":
        key, rest = parts[1], ".".join(parts[2:])
        if key == "embed":
            return f"word_embeddings.{rest}"
        if key.startswith("pool"):
            return f"pool.{int(key[4:])}.{rest}"
        raise ValueError(f"unknown tied module {key} in {name}")
    return ".".join(parts[1:])  # "<layer index>.final_norm.weight" -> "final_norm.weight"


class Canonical:
    """A view of a PipeGPT whose ``named_parameters`` use PoolGPT's names (one entry per local
    parameter: a tied module exists once per stage)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def named_parameters(self):
        for name, p in self.module.named_parameters():
            yield canonical_name(name), p


# ------------------------------------------------------------------ layers
class EmbedIn(tensor_parallel.VocabParallelEmbedding):
    def __init__(self, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
        super().__init__(padded_vocab, cfg.hidden, init_method=_no_init,
                         config=_mp_config(dtype))
        _mark_tp(self, 0)

    def forward(self, inputs):
        tokens, depth = inputs
        return super().forward(tokens), depth


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.dropout
        self.position_embeddings = nn.Embedding(cfg.seq_len, cfg.hidden)

    def forward(self, inputs):
        x, depth = inputs
        positions = torch.arange(x.shape[1], device=x.device)
        x = x + self.position_embeddings(positions)
        return F.dropout(x, self.dropout, self.training), depth


class PoolReplica(Block):
    """This stage's copy of pool layer ``index``: runs once per position of this stage that
    maps to it."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int, n_unique: int,
                 num_stages: int, stage: int):
        super().__init__(cfg, _mp_config(dtype))
        self.index, self.n_unique, self.num_stages, self.stage = index, n_unique, num_stages, stage
        assert [n for n, _ in self.named_parameters()] == BLOCK_PARAMS

    def repeats(self, d: int) -> int:
        lo, hi = stage_positions(d, self.num_stages, self.stage)
        return sum(1 for i in range(lo, hi) if i * self.n_unique // d == self.index)

    def forward(self, inputs):
        x, depth = inputs
        count = self.repeats(int(depth.item()))
        if count == 0 and torch.is_grad_enabled():
            # Exact no-op that gives every parameter a (zero) gradient.
            x = x + 0.0 * sum(p.sum() for p in self.parameters())
        for _ in range(count):
            x = Block.forward(self, x)
        return x, depth


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps)

    def forward(self, inputs):
        x, _depth = inputs
        return self.final_norm(x)


class EmbedOut(tensor_parallel.VocabParallelEmbedding):
    """The tied LM head: the embedding weight used by a column-parallel linear."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
        mp = _mp_config(dtype)
        super().__init__(padded_vocab, cfg.hidden, init_method=_no_init, config=mp)
        _mark_tp(self, 0)
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            cfg.hidden, padded_vocab, config=mp, init_method=_no_init, bias=False,
            gather_output=False, skip_weight_param_allocation=True)
        tp = mp.tensor_model_parallel_size
        rank = parallel_state.get_tensor_model_parallel_rank()
        per_rank = padded_vocab // tp
        local_ids = torch.arange(rank * per_rank, (rank + 1) * per_rank)
        self.register_buffer("pad_mask", local_ids >= cfg.vocab_size, persistent=False)

    def forward(self, x):
        logits, _ = self.lm_head(x, weight=self.weight)
        if self.pad_mask.any():
            logits = logits.masked_fill(self.pad_mask, float("-inf"))
        return logits


def pipe_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    labels, loss_mask = labels
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1)


# ------------------------------------------------------------------ the module
class PipeGPT(PipelineModule):
    def __init__(self, cfg: ModelConfig, n_unique: int, topology, grow: str = "interpolate",
                 dtype: torch.dtype = torch.float32):
        if grow != "interpolate":
            raise ValueError("pipeline parallelism needs apollo.grow=interpolate (a monotone "
                             "layer map)")
        S = topology.get_dim("pipe")
        if cfg.layers < S:
            raise ValueError(f"{S} pipeline stages but only {cfg.layers} layers")
        tp = topology.get_dim("model")
        pv = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to, tp)
        specs, parts = [], [0]
        for k in range(S):
            if k == 0:
                specs += [TiedLayerSpec("embed", EmbedIn, cfg, pv, dtype),
                          LayerSpec(PosEmbed, cfg)]
            for p in stage_pool_layers(n_unique, cfg.layers, S, k):
                specs.append(TiedLayerSpec(f"pool{p}", PoolReplica, cfg, dtype, p, n_unique, S, k,
                                           tied_weight_attr=list(BLOCK_PARAMS)))
            if k == S - 1:
                specs += [LayerSpec(FinalNorm, cfg),
                          TiedLayerSpec("embed", EmbedOut, cfg, pv, dtype)]
            parts.append(len(specs))
        object.__setattr__(self, "_apollo_parts", parts)
        super().__init__(layers=specs, topology=topology, loss_fn=pipe_loss,
                         partition_method="apollo")
        self.cfg = cfg
        self._n_unique = n_unique
        self.to(dtype)

    def _partition_layers(self, method="apollo"):
        # Cut the layer list exactly at the stage boundaries computed above.
        self.parts = list(self._apollo_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    @property
    def n_unique(self) -> int:
        return self._n_unique

    def local_pool_layers(self) -> list[int]:
        return sorted(int(k[4:]) for k in self.tied_modules if k.startswith("pool"))


# ------------------------------------------------------------------ trainer hooks (pp > 1)
def _topology(dist):
    return PipeModelDataParallelTopology(num_pp=dist.pp, num_mp=dist.tp, num_dp=dist.dp)


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


def new_model(trainer, n_unique: int) -> PipeGPT:
    m = trainer.cfg.model
    model = PipeGPT(m, n_unique, _topology(trainer.dist), trainer.cfg.apollo.grow)
    init_weights(Canonical(model), trainer.cfg.train.seed, m.init_std, m.layers, m.vocab_size)
    return model


def build(trainer, n_unique: int, model: PipeGPT | None = None):
    import deepspeed

    from apollo_ds.training.engine import param_groups
    model = model if model is not None else new_model(trainer, n_unique)
    model.to(trainer.dist.device)
    check_topology(model)
    t = trainer.cfg.train
    groups = param_groups(model, t.weight_decay)
    optimizer = None
    if "optimizer" not in trainer.ds_config:
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    # mpu=None: the PipelineModule's own grid (pipe, data, model) is the mpu, as in
    # Megatron-DeepSpeed.
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           optimizer=optimizer, config=trainer.ds_config,
                                           mpu=None)
    # ZeRO-0 fp32 clips with deepspeed.runtime.utils.clip_grad_norm_, which under a pipeline
    # grid counts tied replicas on every owner and drops the non-tensor-parallel parameters of
    # every stage but the first (it tests grid.get_model_parallel_rank() == 0, a pipe x tensor
    # rank); ZeRO 1 (stage_1_and_2) is correct. Clip with the PP=1 norm instead.
    engine.clip_fp32_gradients = lambda: clip_pipe_grad_norm_(model, engine.gradient_clipping())
    return model, engine


@torch.no_grad()
def clip_pipe_grad_norm_(model: PipeGPT, max_norm: float) -> torch.Tensor:
    """DeepSpeed's clip_grad_norm_ (2-norm) with each parameter counted once: tied replicas
    only on their first owner (``ds_pipe_replicated``), tensor-parallel-duplicated ones only on
    TP rank 0; squared norms summed over the pipeline x tensor group of this DP replica."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    params = [p for p in model.parameters() if p.grad is not None]
    norms = [p.grad.detach().float().norm(2) for p in params
             if not getattr(p, "ds_pipe_replicated", False)
             and (tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
    total = (torch.stack(norms).pow(2).sum().float() if norms
             else torch.zeros((), dtype=torch.float32)).reshape(1)
    torch.distributed.all_reduce(total, group=model._grid.get_model_parallel_group())
    total = total.pow(0.5)
    clip_coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total + 1e-6))
    for p in params:
        p.grad.data.mul_(clip_coef)
    return total


def _depth(d: int) -> torch.Tensor:
    return torch.tensor([d], dtype=torch.long)


def run_micro_batches(trainer, step: int, plan) -> torch.Tensor:
    """One optimizer step through ``engine.train_batch``; returns the loss sum over this rank's
    micro-batches (as train_step's PP=1 loop does), float64."""
    from apollo_ds.training.loop import NonFiniteLoss
    d, t = trainer.dist, trainer.cfg.train
    base = (step - 1) * t.global_batch

    def batches():
        for k in range(trainer.grad_accum):
            j = k * d.dp + d.dp_rank
            b = trainer._batch(trainer.train_ds, base + j * t.micro_batch)
            yield (b["tokens"], _depth(plan[k][0])), (b["labels"], b["loss_mask"])

    # Mean over the micro-batches and the DP ranks, broadcast from the last stage.
    loss = trainer.engine.train_batch(batches())
    loss_sum = loss.detach().double().cpu().reshape(1) * trainer.grad_accum
    if trainer._all_ranks_any(not torch.isfinite(loss_sum).all()):
        raise NonFiniteLoss(
            f"non-finite loss at step {step} (depths {[p[0] for p in plan]}, samples "
            f"{base}..{base + t.global_batch - 1}); lower train.lr or check the data")
    # train_step all-reduces this over DP and divides by grad_accum * dp: every DP rank holds
    # the DP mean already, so each contributes mean * grad_accum.
    return loss_sum


@torch.no_grad()
def evaluate(trainer) -> float:
    cfg, d, t = trainer.cfg, trainer.dist, trainer.cfg.train
    if trainer.valid_ds is None:
        return float("nan")
    mine = list(range(d.dp_rank, t.eval_iters * t.global_batch // t.micro_batch, d.dp))
    ga, vals = trainer.grad_accum, []
    for c in range(0, len(mine), ga):
        chunk = mine[c:c + ga]

        def batches(chunk=chunk):
            for j in chunk:
                b = trainer._batch(trainer.valid_ds, j * t.micro_batch)
                yield (b["tokens"], _depth(cfg.model.layers)), (b["labels"], b["loss_mask"])
        out = trainer.engine.eval_batch(batches(), num_micro_batches=len(chunk))
        vals.append(float(out))
    trainer.engine.train()
    return sum(vals) / len(vals)


def _pipe_group():
    return parallel_state.get_pipeline_model_parallel_group()


def gather_over_pipe(local: dict) -> list[dict]:
    """Every stage's dict, in stage order (collective over the pipeline group)."""
    out = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(out, local, group=_pipe_group())
    return out


def merge_first_owner(per_stage: list[dict]) -> dict:
    merged = {}
    for sd in per_stage:
        for k, v in sd.items():
            merged.setdefault(k, v)
    return merged


def _prime(trainer, engine, n_unique: int) -> None:
    """As apollo.expand._prime, through train_batch: one step with lr 0 creates the Adam state
    without moving a weight (the moments it writes are overwritten by write_state)."""
    from apollo_ds.apollo.expand import _relink_optimizer_state
    t = trainer.cfg.train
    saved = [g["lr"] for g in engine.optimizer.param_groups]
    for g in engine.optimizer.param_groups:
        g["lr"] = 0.0
    tokens = torch.zeros(t.micro_batch, trainer.cfg.model.seq_len, dtype=torch.long,
                         device=trainer.dist.device)
    mask = torch.ones(tokens.shape, dtype=torch.float32, device=trainer.dist.device)
    engine.train_batch(iter([((tokens, _depth(n_unique)), (tokens, mask))]
                            * trainer.grad_accum))
    engine.micro_steps = 0
    engine.global_steps = 0
    engine.global_samples = 0
    _relink_optimizer_state(engine)
    for g, lr in zip(engine.optimizer.param_groups, saved):
        g["lr"] = lr


def expand(trainer, n_new: int):
    """apollo.expand.expand_engine under PP: states read by PoolGPT name on each stage,
    exchanged over the pipeline group (a new replica's source may live on another stage), the
    pipeline module rebuilt for the new pool, then written back by name."""
    from apollo_ds.apollo.expand import optimizer_step_count, read_state, source_name, write_state
    cfg = trainer.cfg
    old_model, old_engine = trainer.model, trainer.engine
    n_old = old_model.n_unique
    sources = expansion_sources(n_old, n_new, cfg.apollo.grow)
    local = read_state(old_engine, Canonical(old_model))
    snapshot = merge_first_owner(gather_over_pipe(local))
    step = optimizer_step_count(old_engine)
    old_engine.destroy()
    trainer.model = trainer.engine = None
    del old_model, old_engine, local
    gc.collect()

    model = new_model(trainer, n_new)
    with torch.no_grad():
        for name, p in Canonical(model).named_parameters():
            p.copy_(snapshot[source_name(name, sources)]["param"].to(p.dtype))
    model, engine = build(trainer, n_new, model)
    _prime(trainer, engine, n_new)
    write_state(engine, Canonical(model), snapshot, sources, step,
                reset_new=cfg.apollo.optimizer_state == "reset")
    return model, engine


@torch.no_grad()
def full_state_dict(model: PipeGPT, vocab_size: int) -> tuple[dict, list[dict]]:
    """(full weights with PoolGPT's names, each pool layer from its first owner stage;
    every stage's own full dict, to check that replicas are identical). Collective."""
    from apollo_ds.convert.full_state import full_state_dict as fsd
    per_stage = gather_over_pipe(fsd(Canonical(model), vocab_size))
    return merge_first_owner(per_stage), per_stage
