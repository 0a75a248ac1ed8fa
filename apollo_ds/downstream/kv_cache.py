"""Incremental decoding with a key/value cache, for generation.

``NativeDecoder`` runs a trained PoolGPT (GPT-2 or Llama blocks) at full depth with the
checkpoint's layer map, reusing the training modules' parameters but not their forward (which
has no cache): per depth position i (pool layer ``layer_map[i]``) it keeps the keys and values
of every token seen so far, so each new token costs one token's work. ``HFDecoder`` does the
same for an exported Hugging Face model through its own cache (``cache`` /
``past_key_values``).

Both take a batch of prompts of different lengths, left-padded: pads are masked out as keys
and every row has its own positions (0 at its first real token), so a row's logits do not
depend on the other rows. Positions must stay below the model's seq_len; the caller
(generate.py) falls back to re-running the window when a row reaches it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [b, n] with 0 in the pads, valid [b, n] bool)."""
    n = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), n, dtype=torch.long)
    valid = torch.zeros(len(prompts), n, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, n - len(p):] = True
    return tokens.to(device), valid.to(device)


def _positions(valid: torch.Tensor) -> torch.Tensor:
    return (valid.long().cumsum(1) - 1).clamp(min=0)


class _Decoder:
    """start(prompts) fills the cache and gives each row's last logits; step(tokens) appends
    one token per row. Subclasses provide _reset() and _run(tokens, positions)."""

    @torch.no_grad()
    def start(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts, filling the cache; logits of each row's last token [b, vocab]."""
        tokens, self.valid = _left_pad(prompts, self.device)
        self._reset()
        self.next_pos = self.valid.long().sum(1)
        return self._run(tokens, _positions(self.valid))

    @torch.no_grad()
    def step(self, next_tokens: list[int]) -> torch.Tensor:
        """Append one token per row; its logits [b, vocab]."""
        tokens = torch.tensor(next_tokens, dtype=torch.long, device=self.device)[:, None]
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(next_tokens), 1)], 1)
        pos = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        return self._run(tokens, pos)


class NativeDecoder(_Decoder):
    """Cached full-depth decoding of a PoolGPT (eval mode, TP=1)."""

    def __init__(self, model, layer_map: list[int]):
        self.m, self.lmap = model, list(layer_map)
        self.llama = model.cfg.arch == "llama"
        self.device = next(model.parameters()).device
        if self.llama:
            from apollo_ds.model.llama import rope_tables
            block = model.pool[0]
            self.rope = rope_tables(model.cfg.seq_len, block.head_dim, block.theta, self.device)

    def _reset(self) -> None:
        self.kv: list = [None] * len(self.lmap)

    def _mask(self, s: int) -> torch.Tensor | None:
        """None when no row is padded (plain causal attention, as in training), else
        [b, 1, s, T] bool: key c is visible to query j if it is a real token at or before j;
        every query sees itself, so a pad row stays finite (its output is never used)."""
        if bool(self.valid.all()):
            return None
        T = self.valid.shape[1]
        cols = torch.arange(T, device=self.device)
        rows = torch.arange(T - s, T, device=self.device)
        causal = cols[None, :] <= rows[:, None]
        mask = self.valid[:, None, None, :] & causal[None, None]
        return mask | (cols[None, :] == rows[:, None])[None, None]

    def _run(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m = self.m
        x = m.word_embeddings(tokens)
        if hasattr(m, "position_embeddings"):
            x = x + m.position_embeddings(pos)
        mask = self._mask(tokens.shape[1])
        for i, idx in enumerate(self.lmap):
            x = self._block(m.pool[idx], x, pos, mask, i)
        x = m.final_norm(x[:, -1:])
        logits, _ = m.lm_head(x, weight=m.word_embeddings.weight if m.tied else None)
        return logits[:, -1, :m.vocab_size].float()

    def _block(self, blk, x, pos, mask, i: int) -> torch.Tensor:
        b, s, _ = x.shape
        qkv, _ = blk.qkv(blk.input_norm(x))
        hd = blk.head_dim
        if self.llama:
            from apollo_ds.model.llama import apply_rope
            g, r = blk.local_groups, blk.q_per_group
            qkv = qkv.view(b, s, g, r + 2, hd)
            q = qkv[:, :, :, :r].reshape(b, s, g * r, hd).transpose(1, 2)
            k, v = qkv[:, :, :, r].transpose(1, 2), qkv[:, :, :, r + 1].transpose(1, 2)
            cos, sin = self.rope[0][pos][:, None], self.rope[1][pos][:, None]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:
            q, k, v = qkv.view(b, s, blk.local_heads, 3, hd).permute(3, 0, 2, 1, 4).unbind(0)
        if self.kv[i] is not None:
            k = torch.cat([self.kv[i][0], k], 2)
            v = torch.cat([self.kv[i][1], v], 2)
        self.kv[i] = (k, v)
        gqa = {"enable_gqa": True} if self.llama and blk.q_per_group > 1 else {}
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              is_causal=mask is None and s > 1, **gqa)
        out, _ = blk.proj(attn.transpose(1, 2).reshape(b, s, -1))
        x = x + out
        y = blk.mlp_norm(x)
        if self.llama:
            gate, _ = blk.gate(y)
            up, _ = blk.up(y)
            out, _ = blk.fc2(F.silu(gate) * up)
        else:
            hmid, _ = blk.fc1(y)
            out, _ = blk.fc2(F.gelu(hmid, approximate="tanh"))
        return x + out


class HFDecoder(_Decoder):
    """Cached decoding of a transformers causal LM through its past_key_values."""

    def __init__(self, model, vocab_size: int):
        import inspect
        self.m, self.vocab = model, vocab_size
        self.device = next(model.parameters()).device
        # transformers 5.x renamed past_key_values to cache (the old name warns)
        self.key = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"

    def _run(self, tokens, pos):
        out = self.m(input_ids=tokens, attention_mask=self.valid.long(), position_ids=pos,
                     use_cache=True, **{self.key: self.past})
        self.past = getattr(out, self.key)
        return out.logits[:, -1, :self.vocab].float()

    def _reset(self) -> None:
        self.past = None
