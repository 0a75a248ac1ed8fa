"""Tokenizers of every kind on real files built here from real text: a SentencePiece model
without a pad piece (Llama-2's convention), a byte-level BPE trained by apollo-ds
train-tokenizer (a tokenizer.json), GPT-2 vocab.json + merges.txt and a tiktoken encoding file.
Ids are checked against an independent implementation where one exists (transformers' pure
Python GPT-2 tokenizer, tiktoken's educational BPE), and the Hugging Face conversion the
export writes, reloaded with AutoTokenizer, gives the original's ids on real text."""
from __future__ import annotations

import hashlib
import json
import os
from types import SimpleNamespace

import pytest

from apollo_ds.config import ConfigError
from apollo_ds.data.tokenizer import NO_PAD, TIKTOKEN_PATTERN, fingerprint, load_tokenizer
from tests.conftest import real_text_lines, tokenizer_files


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    lines = real_text_lines(400)
    files = tokenizer_files(d, lines)
    text = files["text"]
    from apollo_ds.data.prep.train_tokenizer import main as train
    assert train(["--input", str(text), "--vocab-size", "420", "--model-prefix",
                  str(d / "bbpe"), "--model-type", "byte-bpe"]) == 0
    return SimpleNamespace(dir=d, lines=lines, text=text, ranks=files["ranks"],
                           nopad=str(d / "nopad.model"), bbpe=str(d / "bbpe.json"),
                           gpt2=str(d / "gpt2"), tiktoken=str(d / "small.tiktoken"))


def test_kinds_detected_with_their_special_ids(toks):
    got = {p: load_tokenizer(p) for p in (toks.nopad, toks.bbpe, toks.gpt2, toks.tiktoken)}
    summary = [(t.kind, t.vocab_size, t.eod, t.pad, t.bos) for t in got.values()]
    assert summary == [("sentencepiece", 400, 2, NO_PAD, 1),
                       ("huggingface", 420, 0, 1, 2),
                       ("gpt2", 380, 0, NO_PAD, None),
                       ("tiktoken", 301, 300, NO_PAD, None)]
    # a folder with a tokenizer.json, and the vocab.json path, are the same tokenizers
    os.makedirs(toks.dir / "hfdir", exist_ok=True)
    (toks.dir / "hfdir" / "tokenizer.json").write_bytes(open(toks.bbpe, "rb").read())
    assert load_tokenizer(str(toks.dir / "hfdir")).kind == "huggingface"
    assert load_tokenizer(os.path.join(toks.gpt2, "vocab.json")).kind == "gpt2"
    for t in got.values():
        for line in toks.lines[:50]:
            ids = t.encode(line)
            assert ids and max(ids) < t.vocab_size and t.decode(ids) == line


def test_gpt2_ids_equal_transformers_python_tokenizer(toks):
    from transformers import GPT2Tokenizer   # the slow, pure-Python BPE
    ref = GPT2Tokenizer(os.path.join(toks.gpt2, "vocab.json"),
                        os.path.join(toks.gpt2, "merges.txt"))
    tok = load_tokenizer(toks.gpt2)
    lines = toks.lines[:150] + ["naïve café — 中文 \t two  spaces", "<|endoftext|> stays text"]
    assert [tok.encode(s) for s in lines] == [ref.encode(s) for s in lines[:-1]] + \
        [tok.encode(lines[-1])]
    assert 0 not in tok.encode(lines[-1])       # the eod spelling in text is not the eod id


def test_tiktoken_ids_equal_the_educational_bpe(toks):
    import tiktoken._educational as edu
    ref = edu.SimpleBytePairEncoding(pat_str=TIKTOKEN_PATTERN, mergeable_ranks=toks.ranks)
    tok = load_tokenizer(toks.tiktoken)
    for line in toks.lines[:40]:
        assert tok.encode(line) == ref.encode(line, visualise=None)


def test_fingerprints(toks, tmp_path):
    # one file: its sha256 (what older runs and datasets recorded)
    assert fingerprint(toks.nopad) == hashlib.sha256(open(toks.nopad, "rb").read()).hexdigest()
    # GPT-2: both files, however the path is spelled; a changed merges.txt changes it
    vocab = os.path.join(toks.gpt2, "vocab.json")
    assert fingerprint(toks.gpt2) == fingerprint(vocab) == load_tokenizer(vocab).fingerprint()
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "vocab.json").write_bytes(open(vocab, "rb").read())
    merges = open(os.path.join(toks.gpt2, "merges.txt")).read().splitlines()
    (other / "merges.txt").write_text("\n".join(merges[:-1]) + "\n")
    assert fingerprint(str(other)) != fingerprint(toks.gpt2)
    assert fingerprint(str(tmp_path / "absent.model")) is None


def test_bad_tokenizers_refused_with_one_line(toks, tmp_path):
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((str(tmp_path / "empty"), None, "holds no tokenizer.json, no vocab.json"))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    cases.append((str(lonely / "vocab.json"), None, "merges.txt is missing"))
    (tmp_path / "x.json").write_text("[1, 2]")
    cases.append((str(tmp_path / "x.json"), None, "neither a tokenizers tokenizer.json"))
    cases.append((toks.tiktoken, "sentencepiece", "is not a valid SentencePiece model"))
    cases.append((toks.nopad, "bpe", "data.tokenizer_type='bpe' is unknown"))
    noeod = tmp_path / "noeod"
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(input=str(toks.text), model_prefix=str(noeod),
                                   vocab_size=300, eos_id=-1, minloglevel=2)
    cases.append((str(noeod) + ".model", None, "has no end-of-document token"))
    for path, kind, message in cases:
        with pytest.raises(ConfigError) as e:
            load_tokenizer(path, kind)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("which", ["nopad", "bbpe", "gpt2", "tiktoken"])
def test_hf_conversion_gives_the_original_ids(toks, which, tmp_path):
    from transformers import AutoTokenizer

    from apollo_ds.convert import hf_tokenizer
    tok = load_tokenizer(getattr(toks, which))
    hf, ids, n = hf_tokenizer.build(tok, 128)
    assert n == tok.vocab_size and ids["eos"] == tok.eod
    assert ids.get("pad", NO_PAD) == tok.pad and ids.get("bos") == tok.bos
    hf.save_pretrained(tmp_path)
    texts = hf_tokenizer.SAMPLES + toks.lines[:200]
    assert hf_tokenizer.check(str(tmp_path), tok, texts, log=print) == len(texts) + 1
    # and independently of check(): what a user gets from AutoTokenizer
    user = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert user.eos_token_id == tok.eod
    for line in toks.lines[200:260]:
        assert user.encode(line, add_special_tokens=False) == tok.encode(line)


def test_tokenizer_config_names_the_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[END]": 2, "[UNK]": 3}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="has no end-of-document token .* name it as "
                                          "eos_token in a tokenizer_config.json"):
        load_tokenizer(str(tmp_path))
    alone = fingerprint(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "[END]"}))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.eod, tok.encode("a b a")) == (2, [0, 1, 0])
    # the config changes the ids that matter, so it is part of the fingerprint
    assert tok.fingerprint() == fingerprint(str(tmp_path / "tokenizer.json")) != alone
