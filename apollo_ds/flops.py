"""Training FLOPs accounting (matmuls only), for metrics and ``apollo-ds plan``.

Counting convention (a multiply-add is 2 FLOPs), per token of a depth-d model, hidden h,
sequence s, padded vocabulary V, MLP width f, key/value heads kv of head size h/heads:
  per layer: QKV h*(h + 2*kv*h/heads) + attention output h^2 + MLP weights, times 2, where the
             MLP is 2*f*h for GPT-2 (f = ffn_mult*h) and 3*f*h for llama's SwiGLU (gate, up,
             down), plus attention scores QK^T and A.V, 2*(2*s*h) (full s x s, causal mask
             ignored; grouped-query attention shares K/V but not these products)
  LM head:   2*h*V
Training = forward + backward (2x forward) = 3x forward. Norms, softmax and the embedding
lookup are ignored: they are a small fraction, and this is the convention Apollo's and
Megatron's FLOPs numbers use.
"""
from __future__ import annotations


def padded_vocab(vocab: int, pad_to: int, tp: int = 1) -> int:
    """Round vocab up to a multiple of pad_to*tp, so each tensor-parallel shard of the
    embedding / LM head has the same, aligned size (Megatron's make-vocab-divisible rule)."""
    if vocab < 1:
        raise ValueError(f"vocab={vocab} must be >= 1")
    if pad_to < 1 or tp < 1:
        raise ValueError(f"pad_to={pad_to} and tp={tp} must be >= 1")
    mult = pad_to * tp
    return -(-vocab // mult) * mult


def layer_forward_flops_per_token(hidden: int, seq_len: int, ffn_mult: int = 4) -> int:
    h, s = hidden, seq_len
    return 2 * (3 * h * h + h * h + 2 * ffn_mult * h * h) + 2 * 2 * s * h


def forward_flops_per_token(hidden: int, seq_len: int, vocab: int, depth: int,
                            ffn_mult: int = 4) -> int:
    if depth < 0:
        raise ValueError(f"depth={depth} must be >= 0")
    return depth * layer_forward_flops_per_token(hidden, seq_len, ffn_mult) + 2 * hidden * vocab


def model_layer_flops_per_token(m) -> int:
    """Forward FLOPs per token of one transformer layer of ``m`` (a config.ModelConfig)."""
    if getattr(m, "arch", "gpt2") != "llama":
        return layer_forward_flops_per_token(m.hidden, m.seq_len, m.ffn_mult)
    from apollo_ds.config import ffn_width, kv_heads_of
    h, s = m.hidden, m.seq_len
    kv_dim = kv_heads_of(m) * (h // m.heads)
    weights = h * (h + 2 * kv_dim) + h * h + 3 * ffn_width(m) * h
    return 2 * weights + 2 * 2 * s * h


def train_flops(model_cfg, depth: float, tokens: float, tp: int = 1) -> float:
    """Forward + backward FLOPs of ``tokens`` tokens through a depth-``depth`` model built
    from ``model_cfg`` (a config.ModelConfig), on the padded vocabulary. ``depth`` may be an
    expected (fractional) depth: the count is affine in depth."""
    m = model_cfg
    V = padded_vocab(m.vocab_size, m.pad_vocab_to, tp)
    per_layer = model_layer_flops_per_token(m)
    head = 2 * m.hidden * V
    return 3.0 * (depth * per_layer + head) * tokens
