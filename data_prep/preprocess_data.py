#!/usr/bin/env python3
"""Tokenize text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    python data_prep/preprocess_data.py --input corpus.txt --tokenizer-model spm8k.model \
        --output-prefix data/corpus [--workers N] [--append-eod] [--chunk-size 64]

Inputs: .txt (one document per line) or .jsonl/.json (one JSON object per line, text under
--json-key). Blank lines / empty texts are skipped. One document = one sequence; with
--append-eod each ends with the tokenizer's eos (the EOD token). Tokens are stored as uint16
when the vocabulary is < 65500, else int32 (megatron-core's DType.optimal_dtype). Also writes
PREFIX.meta.json (tokenizer hash, counts) that apollo_ds checks against data.tokenizer.
Input is streamed through a process pool, so memory does not grow with the corpus.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_W: dict = {}   # per-worker state: tokenizer, options


def fail(msg: str) -> None:
    print(f"preprocess_data.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--json-key", default="text", help="text field of .jsonl records")
    p.add_argument("--tokenizer-model", required=True, metavar="PREFIX.model")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--append-eod", action="store_true", help="end every document with eos")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    return p.parse_args(argv)


def is_jsonl(path: str) -> bool:
    return path.endswith((".jsonl", ".json"))


def has_text(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def read_chunks(paths, chunk_size):
    """Yield lists of (path, line number, raw bytes line); runs in the pool's feeder thread,
    which blocks when the workers' pipe is full, so reading stays just ahead of encoding."""
    chunk = []
    for path in paths:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                chunk.append((path, lineno, raw))
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def init_worker(model_path: str, json_key: str, append_eod: bool, dtype: str) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model_path)
    _W.update(sp=sp, key=json_key, eod=sp.eos_id() if append_eod else None, dtype=dtype)


def encode_chunk(chunk):
    """-> (list of token arrays, input bytes consumed). Errors name file and line."""
    import numpy as np
    texts, nbytes = [], 0
    for path, lineno, raw in chunk:
        nbytes += len(raw)
        try:
            line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
        if is_jsonl(path):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(_W["key"]), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                                 f"'{_W['key']}' (see --json-key)")
            line = rec[_W["key"]]
        if line.strip():
            texts.append(line)
    out = []
    for ids in _W["sp"].encode(texts) if texts else []:
        if _W["eod"] is not None:
            ids.append(_W["eod"])
        out.append(np.asarray(ids, dtype=_W["dtype"]))
    return out, nbytes


def new_builder(bin_path: str, dtype: str):
    with warnings.catch_warnings():   # "Apex / Transformer Engine not installed" noise
        warnings.simplefilter("ignore")
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder(bin_path, dtype=getattr(np, dtype))


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            fail(f"input file not found: {path}")
    if args.workers < 1 or args.chunk_size < 1:
        fail("--workers and --chunk-size must be >= 1")
    from apollo_ds.config import ConfigError
    from apollo_ds.data.tokenizer import load_tokenizer
    try:
        tok = load_tokenizer(args.tokenizer_model)
    except ConfigError as e:
        fail(str(e))
    if not any(has_text(p) for p in args.input):
        fail(f"input is empty: no documents in {', '.join(args.input)}")
    dtype = "uint16" if tok.vocab_size < 65500 else "int32"
    prefix = args.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)

    init = (os.path.abspath(args.tokenizer_model), args.json_key, args.append_eod, dtype)
    pool = None
    if args.workers > 1:
        # Started before megatron/torch are imported, so the forked workers stay small.
        pool = mp.get_context("fork").Pool(args.workers, initializer=init_worker, initargs=init)
    else:
        init_worker(*init)
    from tqdm import tqdm

    bin_tmp, idx_tmp = prefix + ".bin.tmp", prefix + ".idx.tmp"
    builder = None
    total = sum(os.path.getsize(p) for p in args.input)
    docs = tokens = 0
    max_id = -1
    t0 = time.time()
    chunks = read_chunks(args.input, args.chunk_size)
    results = pool.imap(encode_chunk, chunks) if pool else map(encode_chunk, chunks)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
    try:
        for arrays, nbytes in results:
            for ids in arrays:
                if ids.size == 0:
                    continue
                if builder is None:
                    # megatron-core takes ~8 s to import: only once there is a document, so
                    # bad input is refused at once (the workers keep encoding meanwhile).
                    t_imp = time.time()
                    builder = new_builder(bin_tmp, dtype)
                    t_imp = time.time() - t_imp
                builder.add_document(ids, [ids.size])
                docs += 1
                tokens += int(ids.size)
                max_id = max(max_id, int(ids.max()))
            bar.update(nbytes)
            bar.set_postfix(docs=docs, tokens=tokens, refresh=False)
    except ValueError as e:
        bar.close()
        if builder is not None:
            builder.data_file.close()
            os.remove(bin_tmp)
        fail(str(e))
    finally:
        if pool:
            pool.terminate()
    bar.close()
    if builder is None:
        fail(f"input is empty: no documents in {', '.join(args.input)}")
    builder.finalize(idx_tmp)
    # .idx last: its presence marks a finished dataset (the Makefile tests for it).
    os.replace(bin_tmp, prefix + ".bin")
    os.replace(idx_tmp, prefix + ".idx")
    secs = time.time() - t0
    meta = {"tokenizer": os.path.abspath(args.tokenizer_model),
            "tokenizer_sha256": sha256_file(args.tokenizer_model),
            "vocab_size": tok.vocab_size, "eod": tok.eod, "append_eod": args.append_eod,
            "dtype": dtype, "documents": docs, "tokens": tokens, "max_token_id": max_id,
            "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                       for p in args.input],
            "json_key": args.json_key if any(map(is_jsonl, args.input)) else None}
    with open(prefix + ".meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(prefix + ".meta.json.tmp", prefix + ".meta.json")
    print(f"wrote {prefix}.bin/.idx: {docs} documents, {tokens} tokens, {secs:.1f} s, "
          f"{tokens / max(secs, 1e-9):,.0f} tokens/s (the {t_imp:.1f} s megatron-core import "
          f"included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
