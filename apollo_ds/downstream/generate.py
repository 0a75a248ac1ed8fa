"""Continue prompts: greedy, or sampled with temperature, top-k and top-p (nucleus), from a
seeded generator so a sampled run can be repeated; optionally with a repetition penalty
(CTRL's, as Hugging Face's ``repetition_penalty``: the logit of every token already in the
context is divided by it when positive, multiplied when negative). The context is re-run
every token (no key/value cache) and cut to the model's seq_len: meant for inspection, not
serving."""
from __future__ import annotations

import torch


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


def generate(model, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_at_eod: bool = True, repetition_penalty: float = 1.0) -> dict:
    ids = model.encode(prompt)
    gen = torch.Generator().manual_seed(seed)
    new: list[int] = []
    for _ in range(max_new_tokens):
        ctx = (ids + new)[-model.seq_len:]
        logits = model.logits(torch.tensor([ctx], dtype=torch.long))[0, -1]
        logits = penalize_repeats(logits, ctx, repetition_penalty)
        tok = next_token(logits, temperature, top_k, top_p, gen)
        if stop_at_eod and tok == model.eod:
            break
        new.append(tok)
    return {"prompt": prompt, "ids": new, "text": model.decode(new)}
