"""Data pipeline: train_tokenizer.py -> preprocess_data.py -> apollo_ds.data (CPU, no network).

The corpus is real English that every Python install carries: standard-library docstrings.
The scripts run as users run them, in subprocesses of this interpreter.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest

from apollo_ds.config import ConfigError, RunConfig
from apollo_ds.data import (build_datasets, check_data_inputs, check_indexed_dataset,
                            get_micro_batch, load_tokenizer, parse_blend)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(REPO, "data_prep")
VOCAB = 500
MODULES = ["argparse", "collections", "json", "pathlib", "subprocess", "tarfile", "textwrap",
           "threading", "logging", "shutil", "tempfile", "zipfile", "inspect", "datetime",
           "decimal", "fractions", "random", "statistics", "difflib", "email.message",
           "http.client", "unittest.case", "configparser", "csv", "heapq", "functools",
           "itertools", "os", "queue", "string", "calendar", "optparse", "pickle", "enum"]


def stdlib_paragraphs() -> list[str]:
    """Docstring paragraphs of standard-library modules, whitespace collapsed, in a fixed
    order (deterministic for a given Python version)."""
    seen, paras = set(), []

    def add(doc):
        for p in re.split(r"\n\s*\n", doc or ""):
            p = " ".join(p.split())
            if len(p) >= 60 and re.search(r"[a-z]{3,} [a-z]{3,}", p) and p not in seen:
                seen.add(p)
                paras.append(p)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            mod = importlib.import_module(name)
            add(inspect.getdoc(mod))
            for attr in sorted(dir(mod)):
                obj = getattr(mod, attr)
                if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                add(inspect.getdoc(obj))
                if inspect.isclass(obj):
                    for meth in sorted(vars(obj)):
                        fn = getattr(obj, meth, None)
                        if not meth.startswith("_") and callable(fn):
                            add(inspect.getdoc(fn))
    return paras


def run(script: str, *args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert r.returncode == check_rc, f"{script} exited {r.returncode}:\n{r.stderr[-3000:]}"
    return r


def start(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> tuple[str, str]:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, f"{p.args} exited {p.returncode}:\n{err[-3000:]}"
    return out, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    paras = stdlib_paragraphs()
    assert len(paras) > 900, "too little docstring text in this Python"
    train_txt = d / "tok_train.txt"
    train_txt.write_text("\n".join(paras) + "\n")
    # documents: 600 lines, with blank lines sprinkled in (they must be skipped)
    lines = paras[:600]
    corpus = d / "corpus.txt"
    corpus.write_text("".join(l + ("\n\n" if i % 50 == 0 else "\n") for i, l in enumerate(lines)))
    records = paras[600:900]
    jsonl = d / "corpus.jsonl"
    with open(jsonl, "w") as f:
        for i, text in enumerate(records):
            f.write(json.dumps({"id": i, "body": text}) + "\n")
            if i % 100 == 0:
                f.write(json.dumps({"id": -1, "body": ""}) + "\n\n")   # skipped
    model = d / "spm.model"
    run("train_tokenizer.py", "--input", train_txt, "--vocab-size", VOCAB,
        "--model-prefix", d / "spm")
    # the two slow runs (each imports megatron-core) side by side
    p_txt = start("preprocess_data.py", "--input", corpus, "--tokenizer-model", model,
                  "--output-prefix", d / "txt", "--workers", 2, "--chunk-size", 7,
                  "--append-eod")
    p_json = start("preprocess_data.py", "--input", jsonl, "--json-key", "body",
                   "--tokenizer-model", model, "--output-prefix", d / "js", "--workers", 1)
    txt_out = finish(p_txt)
    js_out = finish(p_json)
    return SimpleNamespace(dir=d, lines=lines, records=records, model=str(model),
                           txt=str(d / "txt"), js=str(d / "js"), txt_out=txt_out,
                           js_out=js_out, train_txt=train_txt)


def make_cfg(data, prefix, **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.data.prefix = prefix
    cfg.data.tokenizer = data.model
    cfg.model.vocab_size = kw.get("vocab_size", 512)
    cfg.model.seq_len = kw.get("seq_len", 32)
    cfg.data.split = kw.get("split", "98,2,0")
    cfg.train.out_dir = str(data.dir / "run")
    return cfg


# ------------------------------------------------------------------ tokenizer
def test_tokenizer_ids_and_round_trip(data):
    tok = load_tokenizer(data.model)
    assert (tok.vocab_size, tok.pad, tok.eod) == (VOCAB, 0, 3)
    for text in (data.lines[0], "naïve café — ünïcødé ✓ 中文 \t two  spaces"):
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.decode(ids) == text           # identity normalization + byte fallback


def test_missing_or_corrupt_tokenizer_refused(data, tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ConfigError, match="tokenizer model not found: .*nope.model"):
        load_tokenizer(str(missing))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="bad.model is not a valid SentencePiece model"):
        load_tokenizer(str(bad))
    for model, why in ((missing, "tokenizer model not found"),
                       (bad, "is not a valid SentencePiece model")):
        r = run("preprocess_data.py", "--input", data.dir / "corpus.txt", "--tokenizer-model",
                model, "--output-prefix", tmp_path / "out", check_rc=2)
        assert why in r.stderr and str(model) in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.idx").exists()


# ------------------------------------------------------------------ preprocessing
def test_txt_documents_equal_direct_encoding(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tok = load_tokenizer(data.model)
    ds = IndexedDataset(data.txt)
    assert len(ds) == len(data.lines)
    assert ds.index.dtype.__name__ == "uint16"
    for i in (0, 1, 49, 50, 51, 299, len(data.lines) - 1):
        assert ds[i].tolist() == tok.encode(data.lines[i]) + [tok.eod]
    info = check_indexed_dataset(data.txt)
    assert info.documents == len(data.lines)
    assert info.tokens == sum(len(tok.encode(l)) + 1 for l in data.lines)
    out, err = data.txt_out
    assert f"{len(data.lines)} documents, {info.tokens} tokens" in out and "tokens/s" in out
    assert "tokenizing" in err                      # the progress bar is on stderr
    meta = json.load(open(data.txt + ".meta.json"))
    assert meta["append_eod"] and meta["documents"] == len(data.lines)


def test_jsonl_documents(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    tok = load_tokenizer(data.model)
    ds = IndexedDataset(data.js)
    assert len(ds) == len(data.records)             # empty texts and blank lines skipped
    for i in (0, 1, 100, len(data.records) - 1):
        assert ds[i].tolist() == tok.encode(data.records[i])     # no --append-eod


def test_empty_or_missing_input_refused(data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    for script, extra in (("preprocess_data.py", ["--tokenizer-model", data.model,
                                                   "--output-prefix", tmp_path / "o"]),
                          ("train_tokenizer.py", ["--vocab-size", 400,
                                                  "--model-prefix", tmp_path / "t"])):
        r = run(script, "--input", empty, *extra, check_rc=2)
        assert "input is empty" in r.stderr and "empty.txt" in r.stderr
        r = run(script, "--input", tmp_path / "absent.txt", *extra, check_rc=2)
        assert "input file not found" in r.stderr and "absent.txt" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.idx").exists() and not (tmp_path / "t.model").exists()


def test_bad_jsonl_record_names_line(data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    r = run("preprocess_data.py", "--input", bad, "--tokenizer-model", data.model,
            "--output-prefix", tmp_path / "o", "--workers", 1, check_rc=2)
    assert "bad.jsonl:2" in r.stderr and "'text'" in r.stderr


# ------------------------------------------------------------------ checks
def _copy(prefix: str, dst) -> str:
    out = str(dst / "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, out + ext)
    return out


@pytest.mark.parametrize("damage, message", [
    ("truncate_idx", "is corrupt or truncated: file is"),
    ("bad_magic", "bad magic"),
    ("truncate_bin", "data file .*copy.bin is"),
    ("missing_bin", "indexed dataset file not found: .*copy.bin"),
    ("missing_idx", "indexed dataset file not found: .*copy.idx"),
])
def test_damaged_dataset_refused(data, tmp_path, damage, message):
    p = _copy(data.txt, tmp_path)
    if damage == "truncate_idx":
        os.truncate(p + ".idx", os.path.getsize(p + ".idx") - 8)
    elif damage == "bad_magic":
        with open(p + ".idx", "r+b") as f:
            f.write(b"XXXX")
    elif damage == "truncate_bin":
        os.truncate(p + ".bin", os.path.getsize(p + ".bin") - 2)
    else:
        os.remove(p + (".bin" if damage == "missing_bin" else ".idx"))
    with pytest.raises(ConfigError, match=message) as e:
        check_indexed_dataset(p)
    assert "apollo-ds preprocess" in str(e.value)
    with pytest.raises(ConfigError, match=message):
        check_data_inputs(make_cfg(data, p))


def test_check_data_inputs(data):
    assert check_data_inputs(make_cfg(data, data.txt)) == VOCAB
    assert check_data_inputs(make_cfg(data, [1, data.txt, 2, data.js])) == VOCAB
    with pytest.raises(ConfigError, match=f"tokenizer .*spm.model has {VOCAB} tokens but "
                       f"model.vocab_size=256; set model.vocab_size>={VOCAB}"):
        check_data_inputs(make_cfg(data, data.txt, vocab_size=256))
    # 600 documents: a 0.01% validation share rounds to none, which mcore would loop on
    with pytest.raises(ConfigError, match="leaves the valid split .* empty"):
        check_data_inputs(make_cfg(data, data.txt, split="9999,1,0"))


def test_dataset_from_another_tokenizer_refused(data, tmp_path):
    run("train_tokenizer.py", "--input", data.train_txt, "--vocab-size", 450,
        "--model-prefix", tmp_path / "other")
    cfg = make_cfg(data, data.txt)
    cfg.data.tokenizer = str(tmp_path / "other.model")
    with pytest.raises(ConfigError, match="was tokenized with .*spm.model"):
        check_data_inputs(cfg)


def test_parse_blend():
    assert parse_blend("a/b") == (["a/b"], None)
    assert parse_blend([0.3, "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    assert parse_blend(["30", "a", "70", "b"]) == (["a", "b"], [30.0, 70.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    for bad in ([], [0, "a", 1, "b"], [1, 2], ["a", 1], None, 5):
        with pytest.raises(ConfigError, match="data.prefix"):
            parse_blend(bad)


# ------------------------------------------------------------------ datasets
def test_build_datasets_and_micro_batches(data):
    import torch
    cfg = make_cfg(data, data.txt)
    had_group = torch.distributed.is_initialized()   # another test may have made one
    train, valid = build_datasets(cfg, 200, 8)
    # a private group opened for the build is gone again; an existing one is left alone
    assert torch.distributed.is_initialized() == had_group
    assert valid is not None and len(valid) >= 8 and len(train) >= 200
    b = get_micro_batch(train, 3, 4)
    assert set(b) == {"tokens", "labels", "loss_mask"}
    assert b["tokens"].dtype == b["labels"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32
    assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (4, 32)
    assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    assert bool((b["loss_mask"] == 1).all())
    assert int(b["tokens"].max()) < VOCAB
    assert (b["tokens"] == 3).any()                  # documents end with EOD
    # a pure function of the sample index: repeated calls, a rebuilt (cached) dataset,
    # and the same indices reached through wrap-around all agree
    again = get_micro_batch(build_datasets(cfg, 200, 8)[0], 3, 4)
    assert all(torch.equal(b[k], again[k]) for k in b)
    n = len(train)
    wrapped = get_micro_batch(train, n + 3, 4)
    assert torch.equal(wrapped["tokens"], b["tokens"])
    tail = get_micro_batch(train, n - 1, 2)["tokens"]
    assert torch.equal(tail[1], get_micro_batch(train, 0, 1)["tokens"][0])
    vb = get_micro_batch(valid, 0, 2)
    assert torch.equal(vb["labels"][:, :-1], vb["tokens"][:, 1:])
    assert not torch.equal(vb["tokens"], get_micro_batch(train, 0, 2)["tokens"])


def test_no_validation_split(data):
    train, valid = build_datasets(make_cfg(data, data.txt, split="100,0,0"), 50, 4)
    assert valid is None and len(train) >= 50


def test_blend_two_prefixes_by_weight(data):
    import numpy as np
    import torch
    cfg = make_cfg(data, [0.25, data.txt, 0.75, data.js])
    train, valid = build_datasets(cfg, 400, 8)
    assert len(train) == 400 and valid is not None
    share = np.bincount(np.asarray(train.dataset_index), minlength=2) / len(train)
    assert abs(share[0] - 0.25) < 0.02 and abs(share[1] - 0.75) < 0.02
    b = get_micro_batch(train, 0, 8)
    assert b["tokens"].shape == (8, 32)
    assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
    again = get_micro_batch(build_datasets(cfg, 400, 8)[0], 0, 8)
    assert torch.equal(b["tokens"], again["tokens"])


def test_index_cache_torn_by_a_kill_is_rebuilt(data, tmp_path):
    """A run killed while mcore wrote its index cache leaves a truncated .npy that looks like
    a cache hit; the next build must drop the set and rebuild the same samples."""
    import numpy as np
    import torch
    cfg = make_cfg(data, data.txt)
    cfg.data.cache_dir = str(tmp_path / "cache")
    first = get_micro_batch(build_datasets(cfg, 200, 8)[0], 5, 3)
    npys = sorted((tmp_path / "cache").rglob("*.npy"), key=lambda p: p.stat().st_size)
    assert npys
    torn = npys[-1]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    with pytest.raises(ValueError):     # what mcore would hit on its cache "hit"
        np.load(torn, mmap_mode="r", allow_pickle=True)
    again = get_micro_batch(build_datasets(cfg, 200, 8)[0], 5, 3)
    assert all(torch.equal(first[k], again[k]) for k in first)
    np.load(torn, mmap_mode="r", allow_pickle=True)   # rebuilt whole
