"""The Llama-style transformer layer: RMSNorm, rotary position embeddings, grouped-query
attention, SwiGLU MLP, no biases. Tensor parallelism as in GPT-2's Block (megatron-core
column/row-parallel linears): the fused QKV output is laid out per key/value group as
[kv_heads, heads/kv_heads + 2, head_dim] (the group's query heads, then its key, then its value),
so a TP rank's column slice holds whole groups; gate and up are two column-parallel linears, so
a slice holds matching columns of both.

Rotary embeddings rotate the two halves of each head (HF Llama's ``rotate_half`` convention),
so the export to ``LlamaForCausalLM`` needs no permutation of the query/key rows.

Why not megatron-core's TransformerLayer spec: its attention and rotary code call
``torch.cuda`` buffers that need a CPU shim (apollo_ds/cpu_compat.py), and its parameters are laid
out for its own QKV interleave; one hand-written layer keeps the pool, the layer-map forward,
the layout-free init, expansion and the export reading the same few parameters as GPT-2."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn

from apollo_ds.config import ModelConfig, ffn_width, kv_heads_of
from apollo_ds.model.recompute import checkpoint


def _mark_tp(linear: nn.Module, dim: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    set_tensor_model_parallel_attributes(linear.weight, True, dim, 1)


def _no_init(*_args, **_kwargs):
    return None


def rope_tables(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, ...]:
    """cos and sin of position x frequency, [seq_len, head_dim] (fp32)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                          / head_dim)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class LlamaBlock(nn.Module):
    recompute_core = False   # train.recompute=selective: the attention core re-runs in backward

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        tp = mp.tensor_model_parallel_size
        h = cfg.hidden
        self.head_dim = h // cfg.heads
        kv = kv_heads_of(cfg)
        self.q_per_group = cfg.heads // kv
        self.local_groups = kv // tp
        self.dropout = cfg.dropout
        self.theta = cfg.rope_theta
        self._rope = None
        ffn = ffn_width(cfg)
        self.input_norm = nn.RMSNorm(h, eps=cfg.layernorm_eps)
        self.qkv = tensor_parallel.ColumnParallelLinear(
            h, (cfg.heads + 2 * kv) * self.head_dim, config=mp, init_method=_no_init,
            bias=False, gather_output=False)
        self.proj = tensor_parallel.RowParallelLinear(
            h, h, config=mp, init_method=_no_init, bias=False, input_is_parallel=True,
            skip_bias_add=False)
        self.mlp_norm = nn.RMSNorm(h, eps=cfg.layernorm_eps)
        self.gate = tensor_parallel.ColumnParallelLinear(
            h, ffn, config=mp, init_method=_no_init, bias=False, gather_output=False)
        self.up = tensor_parallel.ColumnParallelLinear(
            h, ffn, config=mp, init_method=_no_init, bias=False, gather_output=False)
        self.fc2 = tensor_parallel.RowParallelLinear(
            ffn, h, config=mp, init_method=_no_init, bias=False, input_is_parallel=True,
            skip_bias_add=False)
        for lin, dim in ((self.qkv, 0), (self.gate, 0), (self.up, 0), (self.proj, 1),
                         (self.fc2, 1)):
            _mark_tp(lin, dim)

    def _tables(self, s: int, device):
        if self._rope is None or self._rope[0].shape[0] < s or self._rope[0].device != device:
            self._rope = rope_tables(s, self.head_dim, self.theta, device)
        return self._rope[0][:s], self._rope[1][:s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        g, r, hd = self.local_groups, self.q_per_group, self.head_dim
        qkv, _ = self.qkv(self.input_norm(x))
        qkv = qkv.view(b, s, g, r + 2, hd)
        q = qkv[:, :, :, :r].reshape(b, s, g * r, hd).transpose(1, 2)
        k = qkv[:, :, :, r].transpose(1, 2)           # [b, g, s, hd]
        v = qkv[:, :, :, r + 1].transpose(1, 2)
        cos, sin = self._tables(s, x.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        core = self.core_attention
        attn = checkpoint(core, q, k, v, p) if self.recompute_core else core(q, k, v, p)
        attn = attn.transpose(1, 2).reshape(b, s, g * r * hd)
        out, _ = self.proj(attn)
        x = x + F.dropout(out, self.dropout, self.training)
        y = self.mlp_norm(x)
        gate, _ = self.gate(y)
        up, _ = self.up(y)
        out, _ = self.fc2(F.silu(gate) * up)
        return x + F.dropout(out, self.dropout, self.training)

    def core_attention(self, q, k, v, p: float) -> torch.Tensor:
        """softmax(QK^T)V with dropout p: what train.recompute=selective re-runs."""
        # enable_gqa: query head i reads key/value head i // r inside the kernel, without
        # materialising r copies of K and V.
        with tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p,
                                                  enable_gqa=self.q_per_group > 1)
