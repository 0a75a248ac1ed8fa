"""GPT-2 (pre-LN, GELU MLP of 4h, learned positions, tied embeddings) whose transformer layers
live in a pool of unique layers. ``forward`` takes a layer map, the pool indices to run in
order, so Apollo's depth plans (or a plain [0..L-1] stack) plug in without model changes.

Tensor parallelism comes from megatron-core's layers: QKV and fc1 are column-parallel, the
attention output and fc2 row-parallel, the embedding vocab-parallel and tied to the LM head,
and the loss is a chunked vocab-parallel cross entropy (apollo_ds.model.loss). The QKV output
is laid out per head as [heads, 3, head_dim], so a TP rank's column slice holds whole heads.

Randomness follows Megatron's rule: dropout on activations every TP rank holds in full (the
embeddings, the residual branches) draws from the default generator, which the trainer seeds
identically on the ranks of one TP group; dropout on a rank's own heads (attention
probabilities) draws from megatron-core's model-parallel RNG tracker, which differs per TP
rank. ``recompute="full"`` re-runs each layer in backward, ``"selective"`` only the attention
core (apollo_ds.model.recompute: non-reentrant, so a pool layer used several times gets one
gradient per micro-batch, and both RNG streams replayed, so the recomputed dropout masks are
the forward's).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from apollo_ds.config import ModelConfig, tied
from apollo_ds.flops import padded_vocab as padded_vocab_size
from apollo_ds.model.llama import LlamaBlock
from apollo_ds.model.loss import vocab_parallel_cross_entropy
from apollo_ds.model.recompute import checkpoint, mode_of
from apollo_ds.model.shared_grads import use_sums


def _mp_config(dtype: torch.dtype) -> ModelParallelConfig:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    # Weights are created on CPU and initialised by apollo_ds.model.init (layout-independent);
    # the trainer moves the model to its device.
    return ModelParallelConfig(tensor_model_parallel_size=tp, params_dtype=dtype,
                               use_cpu_initialization=True, perform_initialization=False,
                               gradient_accumulation_fusion=False)


def _mark_tp(linear: nn.Module, dim: int) -> None:
    # perform_initialization=False skips megatron's init, which is where it tags weights.
    set_tensor_model_parallel_attributes(linear.weight, True, dim, 1)


def _no_init(*_args, **_kwargs):
    return None


def mark_vocab_rows(weight: nn.Parameter) -> None:
    """Tag a parameter whose dim 0 is the padded vocabulary: the init draws only the real rows,
    checkpoints and exports drop the padding (read by init.py, the layout-free checkpoint and
    the export instead of a table of names)."""
    weight.vocab_rows = True


def is_vocab_rows(name: str, p) -> bool:
    return getattr(p, "vocab_rows", False) or name.endswith("word_embeddings.weight")


def register_pad_mask(module: nn.Module, vocab_size: int, padded_vocab: int) -> None:
    """``pad_mask`` over this TP rank's logits: padded vocabulary rows must never receive
    probability mass. ``has_pad`` is known at build time, so the forward never asks the device
    (no host sync)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    per_rank = padded_vocab // tp
    local_ids = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    module.register_buffer("pad_mask", local_ids >= vocab_size, persistent=False)
    module.has_pad = bool((local_ids >= vocab_size).any())


class Block(nn.Module):
    recompute_core = False   # train.recompute=selective: the attention core re-runs in backward

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        h = cfg.hidden
        self.local_heads = cfg.heads // tp
        self.head_dim = h // cfg.heads
        self.dropout = cfg.dropout
        self.input_norm = nn.LayerNorm(h, eps=cfg.layernorm_eps)
        self.qkv = tensor_parallel.ColumnParallelLinear(
            h, 3 * h, config=mp, init_method=_no_init, bias=True, gather_output=False)
        self.proj = tensor_parallel.RowParallelLinear(
            h, h, config=mp, init_method=_no_init, bias=True, input_is_parallel=True,
            skip_bias_add=False)
        self.mlp_norm = nn.LayerNorm(h, eps=cfg.layernorm_eps)
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            h, cfg.ffn_mult * h, config=mp, init_method=_no_init, bias=True, gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(
            cfg.ffn_mult * h, h, config=mp, init_method=_no_init, bias=True,
            input_is_parallel=True, skip_bias_add=False)
        _mark_tp(self.qkv, 0), _mark_tp(self.fc1, 0)
        _mark_tp(self.proj, 1), _mark_tp(self.fc2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, _ = self.qkv(self.input_norm(x))
        # unbind: three views whose backward writes one gradient (indexing qkv[0..2] makes
        # three select-backward copies).
        qkv = qkv.view(b, s, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.dropout if self.training else 0.0
        core = self.core_attention
        attn = checkpoint(core, q, k, v, p) if self.recompute_core else core(q, k, v, p)
        attn = attn.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        out, _ = self.proj(attn)
        x = x + F.dropout(out, self.dropout, self.training)
        hmid, _ = self.fc1(self.mlp_norm(x))
        out, _ = self.fc2(F.gelu(hmid, approximate="tanh"))
        return x + F.dropout(out, self.dropout, self.training)

    def core_attention(self, q, k, v, p: float) -> torch.Tensor:
        """softmax(QK^T)V with dropout p: what train.recompute=selective re-runs."""
        # Attention dropout acts on this rank's heads only: the per-TP-rank RNG stream.
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)


class PoolGPT(nn.Module):
    """GPT whose transformer layers are ``pool[0..n_unique-1]``; see module docstring."""

    def __init__(self, cfg: ModelConfig, n_unique: int, dtype: torch.dtype = torch.float32,
                 recompute: str = "none"):
        super().__init__()
        self.recompute = mode_of(recompute)
        mp = _mp_config(dtype)
        tp = mp.tensor_model_parallel_size
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, cfg.pad_vocab_to, tp)
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            self.padded_vocab, cfg.hidden, init_method=_no_init, config=mp)
        _mark_tp(self.word_embeddings, 0)
        mark_vocab_rows(self.word_embeddings.weight)
        llama = cfg.arch == "llama"
        if not llama:   # llama: rotary positions inside the attention
            self.position_embeddings = nn.Embedding(cfg.seq_len, cfg.hidden)
        block = LlamaBlock if llama else Block
        self.pool = nn.ModuleList(block(cfg, mp) for _ in range(n_unique))
        for layer in self.pool:
            layer.recompute_core = self.recompute == "selective"
        self.final_norm = (nn.RMSNorm(cfg.hidden, eps=cfg.layernorm_eps) if llama else
                           nn.LayerNorm(cfg.hidden, eps=cfg.layernorm_eps))
        # LM head: a column-parallel linear over the vocabulary, with its own weight or
        # borrowing the embedding's (tied).
        self.tied = tied(cfg)
        self.lm_head = tensor_parallel.ColumnParallelLinear(
            cfg.hidden, self.padded_vocab, config=mp, init_method=_no_init, bias=False,
            gather_output=False, skip_weight_param_allocation=self.tied)
        if not self.tied:
            _mark_tp(self.lm_head, 0)
            mark_vocab_rows(self.lm_head.weight)
        register_pad_mask(self, cfg.vocab_size, self.padded_vocab)
        self.to(dtype)

    @property
    def n_unique(self) -> int:
        return len(self.pool)

    def forward(self, tokens: torch.Tensor, layer_map: list[int],
                labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (vocab-parallel shard) when ``labels`` is None, else the mean loss over
        ``loss_mask``."""
        x = self.word_embeddings(tokens)
        if hasattr(self, "position_embeddings"):
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = x + self.position_embeddings(positions)
        x = F.dropout(x, self.cfg.dropout, self.training)
        # bf16: a layer run at several positions sums its uses' gradients in fp32
        sums = use_sums(self.pool, layer_map)
        full = self.recompute == "full"
        for idx in layer_map:
            x = sums[idx].run(x, full) if idx in sums else run_layer(self.pool[idx], x, full)
        x = self.final_norm(x)
        logits, _ = self.lm_head(x, weight=self.word_embeddings.weight if self.tied else None)
        pad = self.pad_mask if self.has_pad else None
        if labels is None:
            return logits if pad is None else logits.masked_fill(pad, float("-inf"))
        # the loss masks the padded rows chunk by chunk (no full-size copy of the logits)
        return lm_loss(logits, labels, loss_mask, pad)


def run_layer(layer, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """One transformer layer; with ``recompute`` (and autograd on) its activations are
    rebuilt in backward."""
    return checkpoint(layer, x) if recompute else layer(x)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None,
            pad_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean vocab-parallel cross entropy over ``loss_mask``: fp32 math on chunks of the logits
    in their own dtype (apollo_ds.model.loss); ``pad_mask``: padded vocabulary rows."""
    losses = vocab_parallel_cross_entropy(logits, labels, pad_mask)
    if loss_mask is None:
        return losses.mean()
    return (losses * loss_mask).sum() / loss_mask.sum().clamp(min=1)
