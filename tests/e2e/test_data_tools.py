"""The installed data tools as users run them (`apollo-ds preprocess`, `train-tokenizer`):
gzip, folder and glob inputs with a dotted JSON key, --bos and --append-eod give exactly the
tokenizer's ids per document, in input order; progress and throughput are shown; a bad line is
named with file and line (exit 2, one line); separate held-out data (data.valid_prefix) is
what evaluation samples read."""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import real_text_lines, run

APOLLO = [sys.executable, "-m", "apollo_ds.cli"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    lines = real_text_lines(300)
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    r = run(APOLLO + ["train-tokenizer", "--input", str(d / "train.txt"), "--vocab-size",
                      "400", "--model-prefix", str(d / "bbpe"), "--model-type", "byte-bpe"])
    assert r.returncode == 0, r.stderr
    src = d / "src"
    (src / "sub").mkdir(parents=True)
    docs = lines[:12]
    # folder src/: a.txt (docs 0-2), sub/b.jsonl.gz (3-5, nested key), sub/c.txt.gz (6-8)
    (src / "a.txt").write_text(f"{docs[0]}\n\n{docs[1]}\n{docs[2]}\n")
    with gzip.open(src / "sub" / "b.jsonl.gz", "wt") as f:
        for i, doc in enumerate(docs[3:6]):
            f.write(json.dumps({"id": i, "meta": {"text": doc}}) + "\n")
    with gzip.open(src / "sub" / "c.txt.gz", "wt") as f:
        f.write("\n".join(docs[6:9]) + "\n")
    (src / "notes.md").write_text("not an input\n")
    # glob shards/*.jsonl: docs 9-11
    (d / "shards").mkdir()
    for i, doc in enumerate(docs[9:12]):
        (d / "shards" / f"s{i}.jsonl").write_text(json.dumps({"meta": {"text": doc}}) + "\n")
    return SimpleNamespace(dir=d, docs=docs, tok=str(d / "bbpe.json"), src=src)


def _documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_folders_globs_gzip_dotted_key_bos_eod(tree):
    from apollo_ds.data.tokenizer import load_tokenizer
    out = tree.dir / "out" / "mix"
    r = run(APOLLO + ["preprocess", "--input", str(tree.src), str(tree.dir / "shards" / "*.jsonl"),
                      "--json-key", "meta.text", "--tokenizer", tree.tok, "--output-prefix",
                      str(out), "--bos", "--append-eod", "--workers", "2", "--chunk-size", "2"])
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tree.tok)
    want = [[tok.bos] + tok.encode(doc) + [tok.eod] for doc in tree.docs]
    assert _documents(str(out)) == want
    assert "tokens/s" in r.stderr and "tokens/s" in r.stdout
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert (meta["documents"], meta["bos"], meta["tokenizer_type"]) == (12, 2, "huggingface")
    assert meta["tokenizer_sha256"] == tok.fingerprint()
    assert [Path(i["path"]).name for i in meta["inputs"]] == \
        ["a.txt", "b.jsonl.gz", "c.txt.gz", "s0.jsonl", "s1.jsonl", "s2.jsonl"]


@pytest.mark.parametrize("content,where,message", [
    (b'{"meta": {"text": "fine"}}\n{"meta": {"txt": "x"}}\n', "bad.jsonl.gz:2",
     "expected an object with a string field 'meta.text'"),
    (b'{"meta": {"text": "fine"}}\n\n{oops\n', "bad.jsonl.gz:3", "not valid JSON"),
    (b"fine\n\xff\xfe broken\n", "bad.txt.gz:2", "not valid UTF-8"),
])
def test_bad_line_named_with_file_and_line(tree, tmp_path, content, where, message):
    bad = tmp_path / where.split(":")[0]
    with gzip.open(bad, "wb") as f:
        f.write(content)
    r = run(APOLLO + ["preprocess", "--input", str(bad), "--json-key", "meta.text",
                      "--tokenizer", tree.tok, "--output-prefix", str(tmp_path / "o"),
                      "--workers", "1"])
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(err) == 1 and err[0].startswith("apollo-ds preprocess: error: ")
    assert where in err[0] and message in err[0]
    assert not (tmp_path / "o.idx").exists() and not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("args,message", [
    (["--input", "NOPE/*.jsonl"], "input pattern NOPE/*.jsonl matches no files"),
    (["--input", "EMPTYDIR"], "input folder EMPTYDIR holds no"),
    (["--input", "SRC", "--bos", "--tokenizer", "GPT2"], "--bos: tokenizer"),
])
def test_inputs_refused_before_work(tree, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    gpt2 = tmp_path / "gpt2"
    from tokenizers import ByteLevelBPETokenizer
    t = ByteLevelBPETokenizer()
    t.train([str(tree.dir / "train.txt")], vocab_size=300, special_tokens=["<|endoftext|>"],
            show_progress=False)
    gpt2.mkdir()
    t.save_model(str(gpt2))
    subst = {"NOPE": str(tmp_path / "nope"), "EMPTYDIR": str(tmp_path / "empty"),
             "SRC": str(tree.src), "GPT2": str(gpt2)}
    args = [next((a.replace(k, v) for k, v in subst.items() if k in a), a) for a in args]
    message = next((message.replace(k, v) for k, v in subst.items() if k in message), message)
    if "--tokenizer" not in args:
        args += ["--tokenizer", tree.tok]
    r = run(APOLLO + ["preprocess", *args, "--output-prefix", str(tmp_path / "o")])
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr


def test_valid_prefix_is_what_evaluation_reads(tree, tmp_path, single_process_group):
    from apollo_ds.config import RunConfig
    from apollo_ds.data import build_datasets
    from apollo_ds.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tree.tok)
    train = tmp_path / "train"
    r = run(APOLLO + ["preprocess", "--input", str(tree.dir / "train.txt"), "--tokenizer",
                      tree.tok, "--output-prefix", str(train), "--append-eod", "--workers", "1"])
    assert r.returncode == 0, r.stderr
    held = tmp_path / "held.txt"      # one document, not in the training text
    held.write_text("The held-out document: " + " ".join(real_text_lines(600)[500:503]) + "\n")
    r = run(APOLLO + ["preprocess", "--input", str(held), "--tokenizer", tree.tok,
                      "--output-prefix", str(tmp_path / "held"), "--workers", "1"])
    assert r.returncode == 0, r.stderr
    cfg = RunConfig()
    cfg.model.vocab_size, cfg.model.seq_len = 512, 16
    cfg.data.prefix, cfg.data.tokenizer = str(train), tree.tok
    cfg.data.valid_prefix = str(tmp_path / "held")
    cfg.train.out_dir = str(tmp_path / "run")
    train_ds, valid_ds = build_datasets(cfg, 20, 4)
    doc = tok.encode(held.read_text().strip())
    assert len(doc) > 17
    # every validation sample is a window of the only held-out document (repeated by epochs)
    cycle = doc * 8
    windows = {tuple(cycle[i:i + 17]) for i in range(len(doc))}
    for i in range(len(valid_ds)):
        s = valid_ds[i]
        assert tuple(s["tokens"].tolist() + s["labels"].tolist()[-1:]) in windows
        assert s["labels"].tolist()[:-1] == s["tokens"].tolist()[1:]
    # training reads all of data.prefix (no split share goes to validation)
    meta = json.loads(Path(str(train) + ".meta.json").read_text())
    assert len(train_ds) >= 20 and len(train_ds.indices) == meta["documents"] > 250
