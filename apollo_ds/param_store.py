"""The layout-free state of a checkpoint as per-rank fragment files, read by byte range.

    <tag>/params/rank_NNNNN.bin   one per rank: raw little-endian fp32, for each fragment the
                                  rank owns its master, then exp_avg, then exp_avg_sq
    <tag>/params/index.json       written by rank 0 from the ranks' metadata (no tensor data)

A fragment is the flat element range [start, start + count) of one parameter's tensor-parallel
local tensor (vocabulary rows padded as that run padded them) that one rank owns: its ZeRO-3
partition, ZeRO-1/2 / bf16 optimizer fragment, or at fp32 ZeRO 0 an even 1/dp slice. Every
rank writes the fragments of every parameter it holds, so tensor-parallel replicas and the
pipeline's tied embedding copy are written by each holder: a resume under the same layout then
reads back exactly the bytes each rank wrote.

index.json: {"format": 2, "optimizer_step", "vocab_size",
             "params": {name: {"shape" (full, vocabulary unpadded), "partition_dim",
                               "vocab_rows"}},
             "fragments": {name: [[file, pp_rank, tp, tp_rank, local_shape, start, count,
                                   byte offset], ...]}}
The three keys of a fragment lie at offset, offset + 4 count, offset + 8 count.

``FragmentReader.read_into`` fills any flat range of any tensor-parallel slice (any TP size,
any vocabulary padding) by reading only the overlapping byte ranges (``os.preadv`` into the
caller's buffer). No DeepSpeed and no process group here: export, eval/generate and init_from
read through it too (``read``: a full tensor or one TP slice, as the older reader did)."""
from __future__ import annotations

import bisect
import json
import math
import os
from collections import Counter

import numpy as np

from apollo_ds.config import ConfigError

FORMAT = 2
KEYS = ("param", "exp_avg", "exp_avg_sq")
INDEX = "index.json"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.bin"


class Fragment:
    __slots__ = ("file", "pp", "tp", "tp_rank", "local_shape", "start", "count", "offset")

    def __init__(self, file, pp, tp, tp_rank, local_shape, start, count, offset):
        self.file, self.pp, self.tp, self.tp_rank = file, int(pp), int(tp), int(tp_rank)
        self.local_shape = [int(n) for n in local_shape]
        self.start, self.count, self.offset = int(start), int(count), int(offset)

    def row(self) -> list:
        return [self.file, self.pp, self.tp, self.tp_rank, self.local_shape, self.start,
                self.count, self.offset]


def is_fragment_index(index: dict) -> bool:
    return index.get("format") == FORMAT


class IndexedParams:
    """What every checkpoint reader knows from its ``index.json``: the parameters by canonical
    name, their full shapes (checked positive), the optimizer step, the vocabulary size."""

    def _read_index(self, index: dict) -> None:
        """Raises ValueError/KeyError/TypeError on a malformed index (the caller names it)."""
        self.params = index["params"]
        self.optimizer_step = int(index["optimizer_step"])
        self.vocab_size = index.get("vocab_size")
        for name, meta in self.params.items():
            if not all(isinstance(n, int) and n > 0 for n in meta["shape"]):
                raise ValueError(f"{name}: shape {meta['shape']}")

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def meta(self, name: str) -> dict:
        if name not in self.params:
            raise ConfigError(f"{self.dir} holds no parameter {name!r}: it was written by "
                              f"another model")
        return self.params[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.meta(name)["shape"])


class FragmentReader(IndexedParams):
    """One checkpoint's fragments, read by canonical name. ``bytes_read`` counts the bytes
    read from each file (a test checks that a rank reads only what it owns)."""

    def __init__(self, params_dir: str, index: dict):
        self.dir, self.index = params_dir, index
        self.index_path = os.path.join(params_dir, INDEX)
        try:
            self._read_index(index)
            self.frags = {name: [Fragment(*row) for row in rows]
                          for name, rows in index["fragments"].items()}
            for name in self.params:
                if name not in self.frags:
                    raise ValueError(f"{name}: no fragments")
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.index_path} is unreadable ({type(e).__name__}: {e}); the "
                              f"checkpoint is incomplete or corrupt: use an older tag") from None
        self.bytes_read: Counter = Counter()
        self._fds: dict[str, int] = {}

    # ------------------------------------------------------------------ metadata
    def vocab_rows(self, name: str) -> bool:
        return bool(self.meta(name).get("vocab_rows"))

    def file(self, name: str) -> str:
        """The files holding ``name`` (for messages)."""
        files = sorted({f.file for f in self.frags.get(name, [])})
        return os.path.join(self.dir, files[0] if len(files) == 1 else "rank_*.bin")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    # ------------------------------------------------------------------ where the bytes are
    def _copy(self, name: str, pp_rank: int | None, tp_rank: int) -> tuple[int, dict]:
        """(old TP size, old tp_rank -> fragments sorted by start) of one stored copy of
        ``name``: this pipeline stage's own if it wrote one, else the first stage's; of a
        replicated tensor this TP rank's replica if there is one, else TP rank 0's."""
        frags = self.frags[name]
        pps = {f.pp for f in frags}
        pp = pp_rank if pp_rank in pps else min(pps)
        frags = [f for f in frags if f.pp == pp]
        if self.meta(name).get("partition_dim") is None:
            ranks = {f.tp_rank for f in frags}
            own = tp_rank if tp_rank in ranks else min(ranks)
            frags = [f for f in frags if f.tp_rank == own]
            by = {0: frags}
            tp = 1
        else:
            tp = frags[0].tp
            by = {}
            for f in frags:
                by.setdefault(f.tp_rank, []).append(f)
            if sorted(by) != list(range(tp)):
                self._corrupt(name, f"fragments of TP ranks {sorted(by)} of {tp}")
        for k, fs in by.items():
            fs.sort(key=lambda f: f.start)
            shape = fs[0].local_shape
            if any(f.local_shape != shape for f in fs):
                self._corrupt(name, "fragments disagree on the local shape")
        return tp, by

    def _corrupt(self, name: str, what: str):
        raise ConfigError(f"parameter {name}: {self.index_path}: {what}; the checkpoint is "
                          f"corrupt: use an older tag")

    def local_shape(self, name: str, tp: int, padded_rows: int | None = None) -> list[int]:
        """The shape of one TP rank's slice at TP size ``tp`` (vocabulary rows padded to
        ``padded_rows`` before slicing)."""
        meta = self.meta(name)
        shape = list(meta["shape"])
        if padded_rows is not None and self.vocab_rows(name):
            if padded_rows < shape[0]:
                raise ConfigError(f"parameter {name}: {self.file(name)} has {shape[0]} "
                                  f"vocabulary rows, more than this model's {padded_rows}")
            shape[0] = padded_rows
        dim = meta.get("partition_dim")
        if dim is not None and tp > 1:
            if shape[dim] % tp:
                raise ConfigError(f"parameter {name}: {self.file(name)} has {shape[dim]} "
                                  f"entries along its tensor-parallel dim {dim}, not divisible "
                                  f"by parallel.tp={tp}")
            shape[dim] //= tp
        return shape

    def pieces(self, name: str, tp: int, tp_rank: int, padded_rows: int | None,
               lo: int, hi: int, pp_rank: int | None = None):
        """(destination offset, fragment or None (zeros), first element in it, count) that
        make up elements [lo, hi) of the flattened local tensor ``local_shape(name, tp,
        padded_rows)`` of TP rank ``tp_rank``; adjacent runs merged."""
        meta = self.meta(name)
        dim = meta.get("partition_dim")
        new = self.local_shape(name, tp, padded_rows)
        old_tp, by = self._copy(name, pp_rank, tp_rank)
        old = by[0][0].local_shape
        d = 0 if dim is None else dim
        t = tp_rank if (dim is not None and tp > 1) else 0
        recorded = list(meta["shape"])
        for i, (a, b) in enumerate(zip(old, new)):
            if i == d:
                continue
            if a != b or len(old) != len(new):
                self._corrupt(name, f"stored slices of shape {old} do not fit the recorded "
                                    f"shape {recorded}")
        old_rows = old[d] * old_tp          # the stored tensor along d, with its padding
        if old_rows < recorded[d] or (old_rows != recorded[d] and not self.vocab_rows(name)):
            self._corrupt(name, f"stored slices of shape {old} x {old_tp} do not fit the "
                                f"recorded shape {recorded}")
        B = math.prod(new[d + 1:])
        Dn, Do = new[d], old[d]
        block = Dn * B
        runs = []
        for a in range(lo // block, (hi - 1) // block + 1 if hi > lo else lo // block):
            s, e = max(lo, a * block) - a * block, min(hi, (a + 1) * block) - a * block
            g, ge = s + t * block, e + t * block        # offsets in the global block
            while g < ge:
                k = g // (Do * B)
                if k >= old_tp:                         # rows past the stored padding
                    n = ge - g
                    runs.append([a * block + g - t * block - lo, None, 0, n])
                    break
                n = min(ge, (k + 1) * Do * B) - g
                runs.append([a * block + g - t * block - lo, k, a * Do * B + g - k * Do * B, n])
                g += n
        merged = []
        for r in runs:
            p = merged[-1] if merged else None
            if (p and p[1] == r[1] and p[0] + p[3] == r[0]
                    and (r[1] is None or p[2] + p[3] == r[2])):
                p[3] += r[3]
            else:
                merged.append(r)
        for dst, k, src, n in merged:
            if k is None:
                yield dst, None, 0, n
                continue
            frags = by[k]
            starts = [f.start for f in frags]
            i = max(0, bisect.bisect_right(starts, src) - 1)
            end = src + n
            while src < end:
                f = frags[i] if i < len(frags) else None
                if f is None or not f.start <= src < f.start + f.count:
                    self._corrupt(name, f"no fragment holds element {src} of TP rank {k}'s "
                                        f"slice")
                m = min(end, f.start + f.count) - src
                yield dst, f, src - f.start, m
                dst, src, i = dst + m, src + m, i + 1

    # ------------------------------------------------------------------ reading
    def _fd(self, file: str) -> int:
        if file not in self._fds:
            path = os.path.join(self.dir, file)
            try:
                self._fds[file] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ConfigError(f"cannot read {path} ({e.strerror}); the checkpoint is "
                                  f"incomplete or corrupt: use an older tag") from None
        return self._fds[file]

    def _pread(self, name: str, f: Fragment, key: int, first: int, out: np.ndarray) -> None:
        fd, offset = self._fd(f.file), f.offset + 4 * (key * f.count + first)
        view, done = memoryview(out).cast("B"), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise ConfigError(f"parameter {name}: {os.path.join(self.dir, f.file)} ends "
                                  f"before byte {offset + len(view)}; the checkpoint is "
                                  f"truncated: use an older tag")
            done += got
        self.bytes_read[f.file] += done

    def read_into(self, name: str, outs: dict, tp: int = 1, tp_rank: int = 0,
                  padded_rows: int | None = None, lo: int = 0, pp_rank: int | None = None
                  ) -> None:
        """Fill ``outs`` ({key: 1-D float32 numpy array of n elements}) with elements
        [lo, lo + n) of the flattened TP slice (rows past the stored vocabulary padding are
        zeros)."""
        n = len(next(iter(outs.values())))
        keys = [(KEYS.index(k), v) for k, v in outs.items()]
        for dst, f, first, m in self.pieces(name, tp, tp_rank, padded_rows, lo, lo + n,
                                            pp_rank):
            for j, out in keys:
                if f is None:
                    out[dst:dst + m] = 0
                else:
                    self._pread(name, f, j, first, out[dst:dst + m])

    def read(self, name: str, tp: int = 1, tp_rank: int = 0, padded_rows: int | None = None,
             expect=None, flat: tuple[int, int] | None = None, keys=KEYS) -> dict:
        """{key: fp32 CPU tensor} of ``name``: vocabulary rows zero-padded to ``padded_rows``
        (before the TP split), then this TP rank's slice along the recorded partition dim,
        then ``flat`` = (start, end) of the flattened result. ``expect``: the shape the
        caller's tensor has (before ``flat``)."""
        import torch
        shape = self.local_shape(name, tp, padded_rows)
        if expect is not None and tuple(shape) != tuple(expect):
            raise ConfigError(f"parameter {name}: {self.file(name)} gives shape {shape} "
                              f"(recorded {list(self.shape(name))}) but the model's is "
                              f"{list(expect)}; the checkpoint was written by another model")
        lo, hi = flat if flat is not None else (0, math.prod(shape))
        outs = {k: np.empty(hi - lo, dtype="<f4") for k in keys}
        if hi > lo:
            self.read_into(name, outs, tp, tp_rank, padded_rows, lo)
        return {k: torch.from_numpy(v) if flat is not None else torch.from_numpy(v).view(shape)
                for k, v in outs.items()}


def load_index(params_dir: str) -> dict:
    path = os.path.join(params_dir, INDEX)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}); the checkpoint is "
                          f"incomplete or corrupt: use an older tag") from None
