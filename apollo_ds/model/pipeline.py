"""Pipeline stages of the pooled GPT as a DeepSpeed PipelineModule (parallel.pp > 1), as
Megatron-DeepSpeed does. This file holds the layer specs only; how a pipelined step runs
(engines, clipping, evaluation, expansion) is apollo_ds.training.pipeline_runtime.

Layer list (README, "How Apollo runs here"):
  stage 0:    EmbedIn (TiedLayerSpec "embed": only the VocabParallelEmbedding), PosEmbed
              (GPT-2's learned positions; for llama only the embedding dropout: rotary
              positions live in the attention)
  stage k:    one replica per pool layer p that stage k can need for some depth d in [N, L]
              (TiedLayerSpec f"pool{p}"), in increasing p; a GPT-2 Block or a LlamaBlock
  last stage: FinalNorm (LayerNorm / RMSNorm), then the LM head: EmbedOut (TiedLayerSpec
              "embed": the embedding weight, when model.tie_embeddings) or LMHead (its own
              weight, llama's default)
The d positions of a micro-batch are split evenly over the S stages: stage k runs positions
[floor(k*d/S), floor((k+1)*d/S)). Position i runs pool layer floor(i*N/d) (interpolate), which is
monotone in i, so a stage runs its replicas in increasing order, each as many times as its
positions map to it.

The depth of each micro-batch is host-side knowledge: every rank derives the step's plan
itself, the runtime hands the depths to ``PipeGPT.set_depths`` before each train/eval batch,
and each stage's forward takes the next one (DeepSpeed's schedules run a stage's forwards in
micro-batch order). Nothing about the depth crosses the wire or syncs with the device.

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

import functools

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from megatron.core import tensor_parallel
from torch import nn

from apollo_ds.config import ModelConfig, tied
from apollo_ds.flops import padded_vocab as padded_vocab_size
from apollo_ds.model.gpt import (Block, _mark_tp, _mp_config, _no_init, lm_loss, mark_vocab_rows,
                                 register_pad_mask, run_layer)
from apollo_ds.model.llama import LlamaBlock
from apollo_ds.model.recompute import mode_of
from apollo_ds.model.shared_grads import use_sums

# The parameters a pool replica ties across stages, by architecture (checked against the
# built layer, so a changed layer cannot silently leave a parameter untied).
BLOCK_PARAMS = {
    "gpt2": ["input_norm.weight", "input_norm.bias", "qkv.weight", "qkv.bias",
             "proj.weight", "proj.bias", "mlp_norm.weight", "mlp_norm.bias",
             "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
    "llama": ["input_norm.weight", "qkv.weight", "proj.weight", "mlp_norm.weight",
              "gate.weight", "up.weight", "fc2.weight"],
}


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


class DepthCursor:
    """The depths of the micro-batches of one train/eval batch, consumed in order by a stage's
    forwards (plain Python state shared by a stage's layers)."""

    def __init__(self):
        self.depths: list[int] = []
        self.next = 0
        self.current = 0

    def set(self, depths: list[int]) -> None:
        self.depths, self.next = list(depths), 0

    def advance(self) -> None:
        if self.next >= len(self.depths):
            raise RuntimeError("pipeline stage ran more micro-batches than the plan has depths "
                               "(call set_depths before each train/eval batch)")
        self.current = self.depths[self.next]
        self.next += 1


# ------------------------------------------------------------------ layers
class EmbedIn(tensor_parallel.VocabParallelEmbedding):
    def __init__(self, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
        super().__init__(padded_vocab, cfg.hidden, init_method=_no_init,
                         config=_mp_config(dtype))
        _mark_tp(self, 0)


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dropout = cfg.dropout
        if cfg.arch != "llama":
            self.position_embeddings = nn.Embedding(cfg.seq_len, cfg.hidden)

    def forward(self, x):
        if hasattr(self, "position_embeddings"):
            positions = torch.arange(x.shape[1], device=x.device)
            x = x + self.position_embeddings(positions)
        return F.dropout(x, self.dropout, self.training)


class _Replica:
    """This stage's copy of pool layer ``index``: runs once per position of this stage that
    maps to it. Mixed into the architecture's layer class (PoolReplica, LlamaPoolReplica), so
    the parameter names are the layer's own."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, index: int, n_unique: int,
                 num_stages: int, stage: int, cursor: DepthCursor, recompute: str):
        super().__init__(cfg, _mp_config(dtype))
        self.index, self.n_unique, self.num_stages, self.stage = index, n_unique, num_stages, stage
        self.cursor, self.recompute = cursor, mode_of(recompute)
        self.recompute_core = self.recompute == "selective"
        assert [n for n, _ in self.named_parameters()] == BLOCK_PARAMS[cfg.arch]

    def repeats(self, d: int) -> int:
        lo, hi = stage_positions(d, self.num_stages, self.stage)
        return sum(1 for i in range(lo, hi) if i * self.n_unique // d == self.index)

    def forward(self, x):
        count = self.repeats(self.cursor.current)
        if count == 0 and torch.is_grad_enabled():
            # Exact no-op that gives every parameter a (zero) gradient.
            x = x + 0.0 * sum(p.sum() for p in self.parameters())
        # the architecture's layer (next in the MRO), or its compiled call (train.compile)
        layer = getattr(self, "block_forward", None) or super().forward
        # bf16: the uses' gradients summed in fp32 (apollo_ds.model.shared_grads)
        sums = use_sums([self], [0] * count)
        if sums:
            layer = functools.partial(sums[0].call, fn=layer)
        for _ in range(count):
            x = run_layer(layer, x, self.recompute == "full")
        return x


class PoolReplica(_Replica, Block):
    pass


class LlamaPoolReplica(_Replica, LlamaBlock):
    pass


class FinalNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.final_norm = (nn.RMSNorm(cfg.hidden, eps=cfg.layernorm_eps) if cfg.arch == "llama"
                           else nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps))

    def forward(self, x):
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
        register_pad_mask(self, cfg.vocab_size, padded_vocab)

    def forward(self, x):
        logits, _ = self.lm_head(x, weight=self.weight)
        if self.has_pad:
            logits = logits.masked_fill(self.pad_mask, float("-inf"))
        return logits


class LMHead(nn.Module):
    """The untied LM head (model.tie_embeddings=false): its own column-parallel weight, named
    ``lm_head.weight`` as in PoolGPT."""

    def __init__(self, cfg: ModelConfig, padded_vocab: int, dtype: torch.dtype):
        super().__init__()
        mp = _mp_config(dtype)
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            cfg.hidden, padded_vocab, config=mp, init_method=_no_init, bias=False,
            gather_output=False)
        _mark_tp(self.lm_head, 0)
        mark_vocab_rows(self.lm_head.weight)
        register_pad_mask(self, cfg.vocab_size, padded_vocab)

    def forward(self, x):
        logits, _ = self.lm_head(x)
        if self.has_pad:
            logits = logits.masked_fill(self.pad_mask, float("-inf"))
        return logits


def pipe_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    labels, loss_mask = labels
    return lm_loss(logits, labels, loss_mask)


# ------------------------------------------------------------------ the module
class PipeGPT(PipelineModule):
    def __init__(self, cfg: ModelConfig, n_unique: int, topology, grow: str = "interpolate",
                 dtype: torch.dtype = torch.float32, recompute: str = "none"):
        if grow != "interpolate":
            raise ValueError("pipeline parallelism needs apollo.grow=interpolate (a monotone "
                             "layer map)")
        S = topology.get_dim("pipe")
        if cfg.layers < S:
            raise ValueError(f"{S} pipeline stages but only {cfg.layers} layers")
        tp = topology.get_dim("model")
        pv = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to, tp)
        cursor = DepthCursor()
        replica = LlamaPoolReplica if cfg.arch == "llama" else PoolReplica
        head = (TiedLayerSpec("embed", EmbedOut, cfg, pv, dtype) if tied(cfg)
                else LayerSpec(LMHead, cfg, pv, dtype))
        specs, parts = [], [0]
        for k in range(S):
            if k == 0:
                specs += [TiedLayerSpec("embed", EmbedIn, cfg, pv, dtype),
                          LayerSpec(PosEmbed, cfg)]
            for p in stage_pool_layers(n_unique, cfg.layers, S, k):
                specs.append(TiedLayerSpec(f"pool{p}", replica, cfg, dtype, p, n_unique, S, k,
                                           cursor, recompute,
                                           tied_weight_attr=list(BLOCK_PARAMS[cfg.arch])))
            if k == S - 1:
                specs += [LayerSpec(FinalNorm, cfg), head]
            parts.append(len(specs))
        object.__setattr__(self, "_apollo_parts", parts)
        super().__init__(layers=specs, topology=topology, loss_fn=pipe_loss,
                         partition_method="apollo")
        object.__setattr__(self, "_cursor", cursor)
        self.cfg = cfg
        self._n_unique = n_unique
        self.to(dtype)

    def _partition_layers(self, method="apollo"):
        # Cut the layer list exactly at the stage boundaries computed above.
        self.parts = list(self._apollo_parts)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def set_depths(self, depths: list[int]) -> None:
        """Depths of the micro-batches of the next train_batch / eval_batch, in order."""
        self._cursor.set(depths)

    def forward(self, forward_input):
        self._cursor.advance()
        return super().forward(forward_input)

    @property
    def n_unique(self) -> int:
        return self._n_unique

    def local_pool_layers(self) -> list[int]:
        return sorted(int(k[4:]) for k in self.tied_modules if k.startswith("pool"))
