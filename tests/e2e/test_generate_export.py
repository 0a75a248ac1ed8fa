"""A whole run on a tokenizer that is not SentencePiece (a byte-level BPE tokenizer.json from
apollo-ds train-tokenizer): preprocess -> train with one growth -> export. The export carries
that tokenizer with identical ids; KV-cache generation gives the uncached path's ids and Hugging
Face's own ``generate`` ids on the export, for a batch of prompts read from a file; the commands
print no dependency noise and no other tool's name."""
from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from tests.conftest import Corpus, pretrain_and_export, real_text_lines, run, tokenizer_files

APOLLO = [sys.executable, "-m", "apollo_ds.cli"]
PROMPTS = ["The king said", "And then the", "It was a"]
NOISE = ("Transformer Engine", "Apex", "Setting accelerator", "ds_accelerator",
         "DeprecationWarning", "FutureWarning", "deprecated", "to_hf:")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("bbpe_run")
    text = d / "text.txt"
    text.write_text("\n".join(real_text_lines(2000)) + "\n")
    r = run(APOLLO + ["train-tokenizer", "--input", str(text), "--vocab-size", "512",
                      "--model-prefix", str(d / "bbpe"), "--model-type", "byte-bpe"])
    assert r.returncode == 0, r.stderr
    r = run(APOLLO + ["preprocess", "--input", str(text), "--tokenizer", str(d / "bbpe.json"),
                      "--output-prefix", str(d / "text"), "--append-eod", "--workers", "1"])
    assert r.returncode == 0, r.stderr
    corpus = Corpus(prefix=str(d / "text"), tokenizer=str(d / "bbpe.json"), vocab=512)
    run_dir, hf = pretrain_and_export(d, corpus)
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    return {"run": run_dir, "hf": hf, "tok": corpus.tokenizer, "prompts": prompts, "dir": d}


def _generate(*args) -> tuple[list[dict], str]:
    r = run(APOLLO + ["generate", *args, "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), r.stderr


def test_export_carries_the_runs_tokenizer(trained):
    from transformers import AutoTokenizer

    from apollo_ds.data.tokenizer import load_tokenizer
    tok = load_tokenizer(trained["tok"])
    hf = AutoTokenizer.from_pretrained(trained["hf"], local_files_only=True)
    texts = real_text_lines(2200)[2000:2200]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == \
        [tok.encode(t) for t in texts]
    assert hf.eos_token_id == tok.eod == 0
    gen = json.loads((trained["hf"] / "generation_config.json").read_text())
    assert "max_length" not in gen and gen["eos_token_id"] == 0


def test_cached_generation_equals_uncached_and_hf_generate(trained):
    n = 40      # prompt + 40 > seq_len 32: the window slides for the last tokens
    common = ["--prompts", str(trained["prompts"]), "--max-new-tokens", str(n)]
    cached, err = _generate("--checkpoint", str(trained["run"]), *common)
    uncached, _ = _generate("--checkpoint", str(trained["run"]), *common, "--no-cache")
    on_export, err_hf = _generate("--checkpoint", str(trained["hf"]), *common, "--batch", "2")
    assert [r["prompt"] for r in cached] == PROMPTS
    assert [r["ids"] for r in cached] == [r["ids"] for r in uncached] \
        == [r["ids"] for r in on_export]
    assert any(len(r["ids"]) > 0 for r in cached)
    for line in (err + err_hf).splitlines():
        assert not any(x in line for x in NOISE), line
    # Hugging Face's own generate on the export (the first 20 tokens: within seq_len)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(trained["hf"], local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(trained["hf"], local_files_only=True)
    for r in cached:
        ids = tok.encode(r["prompt"], add_special_tokens=False)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert not [w for w in caught if "max_length" in str(w.message)]
        hf_ids = out[0, len(ids):].tolist()
        want = r["ids"][:20]
        assert hf_ids[:len(want)] == want


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--temperature", "-1"], "--temperature -1.0: must be a finite number"),
    (["--prompt", "x", "--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--prompt", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["--prompt", ""], "--prompt '': a prompt must have some text"),
    (["--prompts", "/nonexistent.txt"], "--prompts /nonexistent.txt: cannot read it"),
])
def test_bad_generation_options_refused(trained, args, message, capsys):
    from apollo_ds.cli import main
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(trained["run"]), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"apollo-ds generate: error: {message}"), err


def test_export_with_each_tokenizer_kind(trained, tmp_path):
    """The exporter's whole path for every kind (the trained run exported with other
    tokenizers of <= 512 ids: the ids, not the text, are what this checks)."""
    from transformers import AutoTokenizer

    from apollo_ds.convert.to_hf import main as to_hf
    from apollo_ds.data.tokenizer import load_tokenizer
    lines = real_text_lines(400)
    files = tokenizer_files(tmp_path, lines)
    for path in (files["nopad"], files["gpt2"], files["tiktoken"]):
        out = tmp_path / f"hf_{path.stem}"
        assert to_hf(["--checkpoint", str(trained["run"]), "--output", str(out),
                      "--tokenizer", str(path)]) == 0
        tok = load_tokenizer(str(path))
        hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert hf.eos_token_id == tok.eod
        for line in lines[:100]:
            assert hf.encode(line, add_special_tokens=False) == tok.encode(line), tok.kind
