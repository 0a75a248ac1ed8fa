"""Validation of megatron-core indexed datasets (PREFIX.bin / PREFIX.idx) without mcore.

mcore's own reader asserts on a bad header and happily mmaps a truncated index, which then
fails (or reads garbage) deep inside training; these checks refuse such files up front.
The .idx layout (megatron/core/datasets/indexed_dataset.py, _IndexWriter):
  9 B magic b"MMIDIDX\\0\\0" | u64 version (1) | u8 dtype code | u64 S sequences |
  u64 D document-index entries | int32[S] lengths | int64[S] byte pointers | int64[D] doc idx
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

from apollo_ds.config import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 34
# mcore DType codes -> (name, itemsize); floats are valid mcore codes but not token ids.
DTYPES = {1: ("uint8", 1), 2: ("int8", 1), 3: ("int16", 2), 4: ("int32", 4),
          5: ("int64", 8), 6: ("float64", 8), 7: ("float32", 4), 8: ("uint16", 2)}
_FIX = "rerun apollo-ds preprocess to rebuild it"


@dataclass(frozen=True)
class IndexInfo:
    prefix: str
    dtype: str
    itemsize: int
    sequences: int      # = documents for GPT data (one sequence per document)
    documents: int
    tokens: int


def _u64(buf: bytes, off: int) -> int:
    return struct.unpack_from("<Q", buf, off)[0]


def check_indexed_dataset(prefix: str) -> IndexInfo:
    """Refuse a missing, truncated or inconsistent PREFIX.idx / PREFIX.bin pair."""
    prefix = str(prefix)
    idx, binf = prefix + ".idx", prefix + ".bin"
    for path in (idx, binf):
        if not os.path.isfile(path):
            raise ConfigError(f"indexed dataset file not found: {path} (data.prefix={prefix}); "
                              f"build it with apollo-ds preprocess --output-prefix "
                              f"{prefix}")
    size = os.path.getsize(idx)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"indexed dataset index {idx} is corrupt or truncated: {why}; {_FIX}")

    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise bad(f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
        if head[:9] != MAGIC:
            raise bad(f"bad magic {head[:9]!r} (expected {MAGIC!r})")
        version = _u64(head, 9)
        if version != 1:
            raise bad(f"unsupported version {version} (expected 1)")
        code = head[17]
        if code not in DTYPES:
            raise bad(f"unknown dtype code {code}")
        name, itemsize = DTYPES[code]
        if name.startswith("float"):
            raise bad(f"dtype {name} cannot hold token ids")
        n_seq, n_doc = _u64(head, 18), _u64(head, 26)
        expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if size != expected:
            raise bad(f"file is {size} bytes but its header ({n_seq} sequences, {n_doc} "
                      f"document-index entries) implies {expected}")
        if n_seq == 0 or n_doc < 2:
            raise ConfigError(f"indexed dataset {prefix} holds no documents; {_FIX} on a "
                              f"non-empty input")
        # O(1) reads: last length/pointer and the first/last document index entries.
        lengths_at = HEADER_BYTES
        pointers_at = lengths_at + 4 * n_seq
        docs_at = pointers_at + 8 * n_seq
        f.seek(lengths_at + 4 * (n_seq - 1))
        last_len = struct.unpack("<i", f.read(4))[0]
        f.seek(pointers_at + 8 * (n_seq - 1))
        last_ptr = struct.unpack("<q", f.read(8))[0]
        f.seek(docs_at)
        first_doc = struct.unpack("<q", f.read(8))[0]
        f.seek(docs_at + 8 * (n_doc - 1))
        last_doc = struct.unpack("<q", f.read(8))[0]
    if first_doc != 0 or last_doc != n_seq or last_len < 0 or last_ptr < 0:
        raise bad(f"inconsistent tables (document index {first_doc}..{last_doc} for "
                  f"{n_seq} sequences)")
    bin_expected = last_ptr + last_len * itemsize
    bin_size = os.path.getsize(binf)
    if bin_size != bin_expected:
        raise ConfigError(f"indexed dataset data file {binf} is {bin_size} bytes but {idx} "
                          f"implies {bin_expected}; the pair is truncated or from different "
                          f"runs; {_FIX}")
    return IndexInfo(prefix=prefix, dtype=name, itemsize=itemsize, sequences=n_seq,
                     documents=n_doc - 1, tokens=bin_size // itemsize)


def fingerprint(prefixes) -> str:
    """Content fingerprint of datasets, for keying mcore's index cache: mcore keys it by path
    only, so a dataset rebuilt at the same path would silently reuse stale sample indices.
    Hashes the .idx (lengths decide every index) - whole if small, else head and tail - and
    both file sizes; identical for copies of the data on different nodes."""
    h = hashlib.sha256()
    for prefix in prefixes:
        idx = str(prefix) + ".idx"
        size = os.path.getsize(idx)
        h.update(f"{size}:{os.path.getsize(str(prefix) + '.bin')}:".encode())
        with open(idx, "rb") as f:
            if size <= 64 << 20:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(f.read(16 << 20))
                f.seek(size - (16 << 20))
                h.update(f.read())
    return h.hexdigest()[:16]
