"""Tokenize text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx).

    apollo-ds preprocess --input corpus.txt docs/ 'shards/*.jsonl.gz' --tokenizer spm8k.model \
        --output-prefix data/corpus [--json-key text] [--append-eod] [--bos] [--workers N]

Inputs: files, folders (searched recursively) and globs of .txt (one document per line) or
.jsonl/.json (one JSON object per line, text under --json-key, which may be dotted: meta.text),
each optionally .gz. Blank lines / empty texts are skipped; a bad line is named with its file and
line number (exit 2). One document = one sequence; --bos starts each with the tokenizer's bos,
--append-eod ends each with its end-of-document token. Tokens are stored as uint16 when the
vocabulary is < 65500, else int32 (megatron-core's DType.optimal_dtype). Also writes
PREFIX.meta.json (tokenizer fingerprint, counts) that apollo_ds checks against data.tokenizer.
Input is streamed through a process pool, so memory does not grow with the corpus.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

from apollo_ds.data.prep import inputs as inp

_W: dict = {}   # per-worker state: tokenizer, options


class Failed(Exception):
    """Refused input; main prints it as one error line and exits 2."""


def parse_args(argv, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, folders or globs (.txt/.jsonl/.json, optionally .gz)")
    p.add_argument("--json-key", default="text",
                   help="text field of .jsonl records; dotted for nested (default text)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer", required=True,
                   metavar="PATH", help="the run's data.tokenizer (any supported kind)")
    p.add_argument("--tokenizer-type", default="auto",
                   help="sentencepiece, huggingface, gpt2 or tiktoken (default: detected)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--append-eod", action="store_true",
                   help="end every document with the end-of-document token")
    p.add_argument("--bos", action="store_true", help="start every document with bos")
    p.add_argument("--chunk-size", type=int, default=64, help="documents per worker task")
    return p.parse_args(argv)


def read_chunks(paths, chunk_size):
    """Yield lists of (path, line number, raw bytes line, on-disk bytes); runs in the pool's
    feeder thread, which blocks when the workers' pipe is full, so reading stays just ahead
    of encoding."""
    chunk = []
    for path in paths:
        for lineno, raw, nbytes in inp.lines(path):
            chunk.append((path, lineno, raw, nbytes))
            if len(chunk) >= chunk_size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def init_worker(path: str, kind: str, json_key: str, bos: bool, append_eod: bool,
                dtype: str) -> None:
    from apollo_ds.data.tokenizer import load_tokenizer
    tok = load_tokenizer(path, kind)
    _W.update(tok=tok, key=json_key, bos=[tok.bos] if bos else [],
              eod=[tok.eod] if append_eod else [], dtype=dtype)


def encode_chunk(chunk):
    """-> (list of token arrays, on-disk bytes consumed). Errors name file and line."""
    import numpy as np
    texts, nbytes = [], 0
    for path, lineno, raw, size in chunk:
        nbytes += size
        text = inp.document(path, lineno, raw, _W["key"])
        if text is not None:
            texts.append(text)
    out = []
    for ids in _W["tok"].encode_batch(texts) if texts else []:
        out.append(np.asarray(_W["bos"] + list(ids) + _W["eod"], dtype=_W["dtype"]))
    return out, nbytes


def new_builder(bin_path: str, dtype: str):
    from apollo_ds.quiet import quiet_imports
    with quiet_imports():
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder(bin_path, dtype=getattr(np, dtype))


def _check(args):
    from apollo_ds.config import ConfigError
    from apollo_ds.data.tokenizer import load_tokenizer
    if args.workers < 1 or args.chunk_size < 1:
        raise Failed("--workers and --chunk-size must be >= 1")
    try:
        paths = inp.expand(args.input)
        tok = load_tokenizer(args.tokenizer, args.tokenizer_type)
    except ConfigError as e:
        raise Failed(str(e)) from None
    if args.bos and tok.bos is None:
        raise Failed(f"--bos: tokenizer {args.tokenizer} ({tok.kind}) has no bos token; "
                     f"leave out --bos")
    if not any(inp.has_text(p) for p in paths):
        raise Failed(f"input is empty: no documents in {', '.join(paths)}")
    return paths, tok


def _tokenize(args, paths, tok, prefix, dtype, prog):
    """Stream every document into PREFIX.bin.tmp / .idx.tmp; -> (docs, tokens, max id)."""
    from tqdm import tqdm
    init = (os.path.abspath(args.tokenizer), tok.kind, args.json_key, args.bos,
            args.append_eod, dtype)
    pool = None
    if args.workers > 1:
        # Started before megatron/torch are imported, so the forked workers stay small.
        pool = mp.get_context("fork").Pool(args.workers, initializer=init_worker, initargs=init)
    else:
        init_worker(*init)
    bin_tmp = prefix + ".bin.tmp"
    builder = None
    docs = tokens = 0
    max_id = -1
    chunks = read_chunks(paths, args.chunk_size)
    results = pool.imap(encode_chunk, chunks) if pool else map(encode_chunk, chunks)
    total = sum(os.path.getsize(p) for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{prog}: tokenizing", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
    t0 = time.time()
    try:
        for arrays, nbytes in results:
            for ids in arrays:
                if ids.size == 0:
                    continue
                if builder is None:
                    # megatron-core takes seconds to import: only once there is a document,
                    # so bad input is refused at once (the workers keep encoding meanwhile).
                    builder = new_builder(bin_tmp, dtype)
                builder.add_document(ids, [ids.size])
                docs += 1
                tokens += int(ids.size)
                max_id = max(max_id, int(ids.max()))
            bar.update(nbytes)
            bar.set_postfix_str(f"{docs} docs, {tokens / max(time.time() - t0, 1e-9):,.0f} "
                                f"tokens/s", refresh=False)
    except ValueError as e:       # a bad line (ConfigError too: a damaged .gz)
        bar.close()
        if builder is not None:
            builder.data_file.close()
            os.remove(bin_tmp)
        raise Failed(str(e)) from None
    finally:
        if pool:
            pool.terminate()
    bar.close()
    if builder is None:
        raise Failed(f"input is empty: no documents in {', '.join(paths)}")
    builder.finalize(prefix + ".idx.tmp")
    return docs, tokens, max_id


def main(argv=None, prog: str = "preprocess_data.py") -> int:
    args = parse_args(argv, prog)
    try:
        paths, tok = _check(args)
        dtype = "uint16" if tok.vocab_size < 65500 else "int32"
        prefix = args.output_prefix
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        t0 = time.time()
        docs, tokens, max_id = _tokenize(args, paths, tok, prefix, dtype, prog)
    except Failed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    # .idx last: its presence marks a finished dataset (the Makefile tests for it).
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    secs = time.time() - t0
    meta = {"tokenizer": os.path.abspath(args.tokenizer), "tokenizer_type": tok.kind,
            "tokenizer_sha256": tok.fingerprint(),
            "vocab_size": tok.vocab_size, "eod": tok.eod, "append_eod": args.append_eod,
            "bos": tok.bos if args.bos else None,
            "dtype": dtype, "documents": docs, "tokens": tokens, "max_token_id": max_id,
            "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                       for p in paths],
            "json_key": args.json_key if any(map(inp.is_json, paths)) else None}
    with open(prefix + ".meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(prefix + ".meta.json.tmp", prefix + ".meta.json")
    print(f"{prog}: wrote {prefix}.bin/.idx: {docs} documents, {tokens} tokens from {len(paths)} "
          f"file(s), {secs:.1f} s, {tokens / max(secs, 1e-9):,.0f} tokens/s")
    return 0
