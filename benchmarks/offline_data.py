"""Offline training data for benchmarks that run where there is no network and no corpus (the
lent GPU machines): real English text from the Python standard library's docstrings, a
SentencePiece model trained on it (data_prep/train_tokenizer.py) and an indexed dataset
(data_prep/preprocess_data.py), through the same scripts users run."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_text(max_lines: int) -> list[str]:
    """Real English offline: docstrings (> 200 characters, one per line) of the standard
    library, test suites left out; sorted walk, so every machine with the same Python makes the
    same text."""
    stdlib = sysconfig.get_paths()["stdlib"]
    lines = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if "test" not in d and d not in
                         ("site-packages", "dist-packages", "__pycache__", "idlelib"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                with open(os.path.join(root, f), errors="ignore") as fh:
                    tree = ast.parse(fh.read())
            except (SyntaxError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 200:
                        lines.append(" ".join(doc.split()))
            if len(lines) >= max_lines:
                return lines[:max_lines]
    return lines


def make_data(work: str, vocab: int, n: int, log=print) -> dict:
    """Tokenizer (``vocab`` pieces) + indexed dataset of ``n`` docstrings in ``work``; reused
    when a previous run left them."""
    d = os.path.join(work, "data")
    os.makedirs(d, exist_ok=True)
    txt = os.path.join(d, f"stdlib_{n}.txt")
    spm = os.path.join(d, f"spm{vocab}")
    prefix = os.path.join(d, f"stdlib_{n}_spm{vocab}")
    t0 = time.perf_counter()
    if not os.path.exists(txt):
        lines = stdlib_text(n)
        with open(txt + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(txt + ".tmp", txt)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cpus = os.cpu_count() or 1
    steps = [(spm + ".model", ["data_prep/train_tokenizer.py", "--input", txt, "--vocab-size",
                               str(vocab), "--model-prefix", spm, "--threads", str(cpus)]),
             (prefix + ".idx", ["data_prep/preprocess_data.py", "--input", txt,
                                "--tokenizer-model", spm + ".model", "--output-prefix", prefix,
                                "--append-eod", "--workers", str(min(4, cpus))])]
    for done, cmd in steps:
        if os.path.exists(done):
            continue
        log(f"data: {' '.join(cmd[:1])} ...")
        r = subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SystemExit(f"offline_data: {cmd[0]} failed:\n{r.stdout[-2000:]}"
                             f"{r.stderr[-4000:]}")
    with open(prefix + ".meta.json") as f:
        meta = json.load(f)
    log(f"data: {meta['documents']} documents, {meta['tokens']} tokens, tokenizer vocab "
        f"{meta['vocab_size']} ({time.perf_counter() - t0:.1f} s)")
    return {"prefix": prefix, "tokenizer": spm + ".model", "documents": meta["documents"],
            "tokens": meta["tokens"], "tokenizer_vocab": meta["vocab_size"],
            "cache_dir": os.path.join(work, "index_cache")}
