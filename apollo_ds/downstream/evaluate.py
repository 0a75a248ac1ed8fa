"""Mean next-token loss and perplexity of a model on held-out text.

The text is one token stream: documents (lines of ``--text`` files, or the documents of an
indexed dataset's split) tokenized and joined with the end-of-document id, as in training. The
stream is cut into non-overlapping windows of seq_len + 1 tokens (the last partial window is
dropped); each window scores its seq_len next-token predictions, and the loss is the mean over
all of them, so every backend that sees the same windows reports the same number."""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from apollo_ds.config import ConfigError


def text_documents(paths: list[str]) -> list[str]:
    docs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                docs += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise ConfigError(f"--text {p}: cannot read it ({e.strerror})") from None
    if not docs:
        raise ConfigError(f"--text {' '.join(paths)}: no non-empty lines to evaluate on")
    return docs


def dataset_stream(prefix: str, split: str, which: str = "valid") -> list[int]:
    """Token ids of the ``which`` split's documents of an indexed dataset, as training splits
    them (``data.split``, by documents)."""
    from apollo_ds.data.datasets import split_ranges
    from apollo_ds.data.indexed import check_indexed_dataset
    info = check_indexed_dataset(prefix)
    rng = split_ranges(split, info.documents)[("train", "valid", "test").index(which)]
    if rng is None or rng[0] == rng[1]:
        raise ConfigError(f"--data {prefix}: the {which} split of data.split={split} is empty; "
                          f"pass --split with a non-zero {which} weight")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    out: list[int] = []
    for i in range(*rng):
        out += ds[i].tolist()
    return out


def windows(stream: list[int], seq_len: int, limit: int | None = None) -> torch.Tensor:
    n = (len(stream) - 1) // seq_len
    if limit:
        n = min(n, limit)
    if n < 1:
        raise ConfigError(f"the held-out text has {len(stream)} tokens, fewer than one window "
                          f"of seq_len + 1 = {seq_len + 1}; give more text")
    t = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    return torch.stack([t[i * seq_len: (i + 1) * seq_len + 1] for i in range(n)])


def evaluate(model, stream: list[int], batch: int = 8, limit: int | None = None,
             progress=True) -> dict:
    w = windows(stream, model.seq_len, limit)
    total, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(w), batch):
        chunk = w[i: i + batch]
        logits = model.logits(chunk[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                               chunk[:, 1:].reshape(-1).to(logits.device), reduction="sum")
        total += loss.item()
        count += chunk[:, 1:].numel()
        if progress:
            done = min(i + batch, len(w))
            sys.stderr.write(f"\reval: {done}/{len(w)} windows ({100 * done // len(w)}%) | "
                             f"loss {total / count:.4f} | {time.perf_counter() - t0:.1f}s")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "windows": len(w),
            "model": model.name, "kind": model.kind}
