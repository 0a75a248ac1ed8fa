"""Continue prompts: greedy, or sampled with temperature, top-k and top-p (nucleus), from a
seeded generator per prompt so a sampled run can be repeated; optionally with a repetition
penalty (CTRL's, as Hugging Face's ``repetition_penalty``: the logit of every token already in
the context is divided by it when positive, multiplied when negative).

Prompts are decoded together, with a key/value cache (kv_cache.py): each new token costs one
token's work. The context is the last seq_len tokens: once a row's context would pass seq_len,
every step re-runs the window without the cache (positions shift), as the uncached path
(``use_cache=False``) does at every step; both give the same ids.
"""
from __future__ import annotations

import math

import torch

from apollo_ds.config import ConfigError


def check_options(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                  repetition_penalty: float) -> None:
    """ConfigError (one line naming the option) for a sampling setting out of range."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be a finite number >= 0 "
                          f"(0: greedy)")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k}: must be >= 0 (0: no top-k cut)")
    if not (0 < top_p <= 1):       # also refuses NaN
        raise ConfigError(f"--top-p {top_p}: must be in (0, 1] (1: no nucleus cut)")
    if not (repetition_penalty > 0) or not math.isfinite(repetition_penalty):
        raise ConfigError(f"--repetition-penalty {repetition_penalty}: must be > 0 (1: none; "
                          f"1.2-1.5 discourages loops)")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.double() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0 < top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        probs /= probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def penalize_repeats(logits: torch.Tensor, context: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not context:
        return logits
    idx = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
    seen = logits[idx]
    return logits.scatter(0, idx, torch.where(seen > 0, seen / penalty, seen * penalty))


def generate_batch(model, prompts: list[str], max_new_tokens: int = 32,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, stop_at_eod: bool = True, repetition_penalty: float = 1.0,
                   use_cache: bool = True) -> list[dict]:
    """One result per prompt ({prompt, ids, text}); prompt i samples with seed + i."""
    check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    ids = [model.encode(p) for p in prompts]
    for p, x in zip(prompts, ids):
        if not x:
            raise ConfigError(f"prompt {p!r} is empty (no tokens); give some text")
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    dec = model.decoder() if use_cache and getattr(model, "decoder", None) else None
    cached = False         # the decoder holds every row's whole context
    for _ in range(max_new_tokens):
        ctxs = [(x + n)[-model.seq_len:] for x, n in zip(ids, new)]
        fits = all(len(x) + len(n) <= model.seq_len for x, n in zip(ids, new))
        if dec is not None and fits:
            logits = dec.step([n[-1] if n else model.eod or 0 for n in new]) if cached \
                else dec.start(ctxs)
            cached = True
        else:
            cached = False
            logits = [model.logits(torch.tensor([c], dtype=torch.long))[0, -1] for c in ctxs]
        for i, ctx in enumerate(ctxs):
            if done[i]:
                continue
            tok = next_token(penalize_repeats(logits[i], ctx, repetition_penalty),
                             temperature, top_k, top_p, gens[i])
            if stop_at_eod and tok == model.eod:
                done[i] = True
            else:
                new[i].append(tok)
        if all(done):
            break
    return [{"prompt": p, "ids": n, "text": model.decode(n)} for p, n in zip(prompts, new)]


def generate(model, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_at_eod: bool = True, repetition_penalty: float = 1.0,
             use_cache: bool = True) -> dict:
    """One prompt (see generate_batch)."""
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed,
                          stop_at_eod, repetition_penalty, use_cache)[0]
