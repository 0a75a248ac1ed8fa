"""Training data: checks of the configured inputs, megatron-core GPT datasets, micro-batches.

torch / megatron-core are imported inside the functions that need them: ``check_data_inputs``
must stay fast (megatron.core alone takes ~8 s to import on the CPU machines).
"""
from __future__ import annotations

import contextlib
import json
import numbers
import os
import re

from apollo_ds.config import ConfigError, RunConfig
from apollo_ds.data.indexed import IndexInfo, check_indexed_dataset, fingerprint
from apollo_ds.data.tokenizer import Tokenizer, load_tokenizer

SPLIT_NAMES = ("train", "valid", "test")


def _is_weight(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, numbers.Real):
        return True
    return isinstance(x, str) and re.fullmatch(r"\s*[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?\s*", x) \
        is not None


def parse_blend(prefix) -> tuple[list[str], list[float] | None]:
    """data.prefix -> (prefixes, weights or None). Accepts a path, a list of paths, or a
    Megatron blend list [w1, p1, w2, p2, ...]."""
    usage = (f"data.prefix={prefix!r}: expected a dataset prefix (PATH for PATH.bin/PATH.idx) "
             f"or a blend list [weight, prefix, weight, prefix, ...]")
    if isinstance(prefix, (str, os.PathLike)):
        if str(prefix).strip() == "":
            raise ConfigError(usage)
        return [str(prefix)], None
    if not isinstance(prefix, (list, tuple)) or not prefix:
        raise ConfigError(usage)
    items = list(prefix)
    if len(items) % 2 == 0 and all(_is_weight(w) for w in items[0::2]) \
            and all(isinstance(p, str) and not _is_weight(p) for p in items[1::2]):
        weights = [float(w) for w in items[0::2]]
        paths = [p.strip() for p in items[1::2]]
        if any(not (w > 0) for w in weights):
            raise ConfigError(f"data.prefix={prefix!r}: blend weights must be > 0")
        # mcore builds a needless BlendedDataset around a single weighted prefix
        return (paths, None) if len(paths) == 1 else (paths, weights)
    if all(isinstance(p, str) and not _is_weight(p) and p.strip() for p in items):
        return [p.strip() for p in items], None
    raise ConfigError(usage)


def split_ranges(split: str, n_docs: int) -> list[tuple[int, int] | None]:
    """Document ranges per split, as mcore computes them (blended_megatron_dataset_config +
    builder): normalized weights -> cumulative book-ends -> int(round(bound * n_docs))."""
    nums = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
    if not nums or len(nums) > 3 or sum(nums) <= 0:
        raise ConfigError(f"data.split={split!r}: give up to three non-negative weights for "
                          f"train,valid,test with a positive sum, e.g. 98,2,0")
    nums += [0.0] * (3 - len(nums))
    total = sum(nums)
    bounds, acc = [0.0], 0.0
    for w in nums:
        acc += w / total
        bounds.append(acc)
    out = []
    for i, w in enumerate(nums):
        out.append(None if w == 0 else (int(round(bounds[i] * n_docs)),
                                        int(round(bounds[i + 1] * n_docs))))
    return out


def _check_split(cfg: RunConfig, info: IndexInfo) -> None:
    ranges = split_ranges(cfg.data.split, info.sequences)
    if ranges[0] is None:
        raise ConfigError(f"data.split={cfg.data.split!r} gives no training data; give the "
                          f"first (train) weight a positive value, e.g. 98,2,0")
    for name, r in zip(SPLIT_NAMES, ranges):
        # An empty split with a positive weight would make mcore's GPTDataset loop forever
        # (it adds epochs of 0 tokens until it has enough).
        if r is not None and r[0] == r[1]:
            raise ConfigError(
                f"data.split={cfg.data.split!r} leaves the {name} split of {info.prefix} "
                f"empty ({info.documents} documents in all); use a corpus with more "
                f"documents or a larger {name} share (e.g. data.split=90,10,0), or set that "
                f"weight to 0")


def _check_meta(prefix: str, tok: Tokenizer) -> None:
    """apollo-ds preprocess writes PREFIX.meta.json; refuse data made with another tokenizer."""
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            meta = json.load(f)
        want = meta["tokenizer_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if want != tok.fingerprint():
        raise ConfigError(
            f"indexed dataset {prefix} was tokenized with {meta.get('tokenizer', '?')}, a "
            f"different model than data.tokenizer={tok.path}; set data.tokenizer to that "
            f"one or rerun apollo-ds preprocess --tokenizer {tok.path} --output-prefix {prefix}")


def _checked_inputs(cfg: RunConfig):
    d = cfg.data
    prefixes, weights = parse_blend(d.prefix)
    infos = [check_indexed_dataset(p) for p in prefixes]
    held_out = {}          # "valid"/"test" -> (prefixes, weights) of separate held-out data
    for name in ("valid", "test"):
        value = getattr(d, f"{name}_prefix")
        if value not in (None, "", []):
            try:
                held_out[name] = parse_blend(value)
            except ConfigError as e:
                raise ConfigError(str(e).replace("data.prefix", f"data.{name}_prefix")) from None
    tok = load_tokenizer(d.tokenizer, d.tokenizer_type)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but "
                          f"model.vocab_size={cfg.model.vocab_size}; set "
                          f"model.vocab_size>={tok.vocab_size}")
    extra = [check_indexed_dataset(p) for ps, _ in held_out.values() for p in ps]
    for info in infos + extra:
        if not held_out:
            _check_split(cfg, info)
        if info.itemsize < 4 and tok.vocab_size > (1 << (8 * info.itemsize)):
            raise ConfigError(f"indexed dataset {info.prefix} stores {info.dtype} tokens, too "
                              f"narrow for tokenizer {tok.path} ({tok.vocab_size} tokens); "
                              f"rerun apollo-ds preprocess with this tokenizer")
        _check_meta(info.prefix, tok)
    return prefixes, weights, infos, tok, held_out


def check_data_inputs(cfg: RunConfig) -> int:
    """Validate every dataset prefix, the tokenizer and the vocabulary fit; no process group
    needed. Returns the tokenizer's vocabulary size."""
    return _checked_inputs(cfg)[3].vocab_size


@contextlib.contextmanager
def _process_group_for_mcore():
    """mcore's BlendedDataset calls torch.distributed.get_rank() whenever it writes its index
    cache (blended_dataset.py), which raises without a process group. In a lone process we
    hold a private 1-rank gloo group (in-memory store, no network) for the build only."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def drop_broken_cache(cache_dir: str) -> list[str]:
    """A process killed while megatron-core wrote its index cache leaves a truncated .npy that
    the next run takes for a cache hit and cannot load. Every .npy here is opened (header and
    size, memory-mapped); if one fails, the whole cache directory's files are removed so mcore
    rebuilds them. Returns the removed names."""
    import numpy as np
    if not os.path.isdir(cache_dir):
        return []
    names = sorted(os.listdir(cache_dir))
    for name in names:
        if name.endswith(".npy"):
            try:
                np.load(os.path.join(cache_dir, name), mmap_mode="r", allow_pickle=True)
            except (OSError, ValueError, EOFError):
                break
    else:
        return []
    for name in names:
        path = os.path.join(cache_dir, name)
        if os.path.isfile(path):
            os.remove(path)
    return names


def build_datasets(cfg: RunConfig, train_samples: int, valid_samples: int):
    """megatron-core GPTDatasets (blended when data.prefix lists several prefixes) ->
    (train_ds, valid_ds or None). Collective when torch.distributed is initialized: every
    rank must call it (mcore builds the index cache on rank 0, barrier, then the others load
    it), so the cache directory must be shared by all ranks."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights, infos, tok, held_out = _checked_inputs(cfg)
    if train_samples < 1:
        raise ValueError(f"train_samples={train_samples} must be >= 1")
    if held_out:
        has_valid = "valid" in held_out
        # separate held-out data: every split reads the whole of its own prefixes
        data = dict(blend=None, split=None, blend_per_split=[
            (prefixes, weights), held_out.get("valid"), held_out.get("test")])
        all_prefixes = prefixes + [p for ps, _ in held_out.values() for p in ps]
    else:
        has_valid = split_ranges(cfg.data.split, infos[0].sequences)[1] is not None
        data = dict(blend=(prefixes, weights), split=cfg.data.split)
        all_prefixes = prefixes
    cache_root = cfg.data.cache_dir or os.path.join(cfg.train.out_dir, "index_cache")
    import torch.distributed as tdist
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        # rank 0 builds the cache first while the others wait in mcore's barrier
        drop_broken_cache(os.path.join(cache_root, fingerprint(all_prefixes)))
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_len,
        **data,
        # keyed by content too: mcore's own key is the prefix path (see indexed.fingerprint)
        path_to_cache=os.path.join(cache_root, fingerprint(all_prefixes)),
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,   # the model builds its causal mask itself
    )
    # 0 (not None) for unused splits: mcore refuses None sizes when weights are given.
    sizes = [int(train_samples), max(1, int(valid_samples or 1)) if has_valid else 0, 0]
    with _process_group_for_mcore():
        train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, lambda: True, config).build()
    return train_ds, (valid_ds if has_valid else None)


def get_micro_batch(ds, start: int, count: int) -> dict:
    """Samples start..start+count-1 (mod len(ds)) as tensors: tokens / labels (next tokens)
    LongTensor[count, seq_len], loss_mask FloatTensor[count, seq_len]. A pure function of the
    global sample index, so every rank and data-parallel layout sees the same sample i."""
    import torch

    n = len(ds)
    if n <= 0:
        raise ValueError("dataset is empty")
    rows = [ds[(int(start) + i) % n] for i in range(int(count))]
    return {
        "tokens": torch.stack([r["tokens"] for r in rows]).long(),
        "labels": torch.stack([r["labels"] for r in rows]).long(),
        "loss_mask": torch.stack([r["loss_mask"] for r in rows]).float(),
    }
