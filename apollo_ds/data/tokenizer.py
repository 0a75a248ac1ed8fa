"""The run's tokenizer, whatever its format: the few things training, data prep and
megatron-core's GPTDataset need.

Four kinds, detected from the path or given as ``data.tokenizer_type``:

* ``sentencepiece`` - a ``.model`` file (with or without a pad piece: Llama-2's pad_id=-1
  works; eos is the end-of-document token).
* ``huggingface`` - a ``tokenizers`` ``tokenizer.json`` or a folder holding one (its
  ``tokenizer_config.json``, when present, names the eos/bos/pad tokens).
* ``gpt2`` - GPT-2 byte-level BPE files: a folder with ``vocab.json`` + ``merges.txt``, or the
  ``vocab.json`` itself with ``merges.txt`` beside it; eod is ``<|endoftext|>``.
* ``tiktoken`` - a tiktoken encoding file (``base64-token rank`` lines, as
  ``cl100k_base.tiktoken``); split with the cl100k pattern, ``<|endoftext|>`` appended as the
  id after the last rank.

Each is read by its own library (sentencepiece, tokenizers, tiktoken). A tokenizer without a
pad token gets ``pad = -1``: megatron-core's "no pad" id, never a real token, so padded sample
tails are still masked. Kept free of torch/megatron imports so the data tools start quickly.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict

from apollo_ds.config import ConfigError
from apollo_ds.rundir import sha256

KINDS = ("sentencepiece", "huggingface", "gpt2", "tiktoken")
_RETRAIN = "train one with apollo-ds train-tokenizer"
NO_PAD = -1        # megatron-core's _PAD_TOKEN_ID
# cl100k_base's split pattern (tiktoken files carry no pattern of their own)
TIKTOKEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT = "<|endoftext|>"
_EOS_NAMES = (ENDOFTEXT, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*\s+\d+\s*$")


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _with_config(tokenizer_json: str) -> list[str]:
    """A tokenizer.json and, when present, the tokenizer_config.json beside it (its eos/bos/pad
    names change the special ids, so it is part of the fingerprint)."""
    conf = os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")
    return [tokenizer_json] + ([conf] if os.path.isfile(conf) else [])


def detect(path: str) -> tuple[str, list[str]]:
    """(kind, the files that define the tokenizer) for a tokenizer path; ConfigError if none
    of the four kinds fits."""
    if os.path.isdir(path):
        have = lambda n: os.path.isfile(os.path.join(path, n))  # noqa: E731
        if have("tokenizer.json"):
            return "huggingface", _with_config(os.path.join(path, "tokenizer.json"))
        if have("vocab.json") and have("merges.txt"):
            return "gpt2", [os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")]
        found = sorted(n for n in os.listdir(path) if n.endswith((".model", ".tiktoken")))
        if len(found) == 1:
            return detect(os.path.join(path, found[0]))
        raise ConfigError(f"tokenizer folder {path} holds no tokenizer.json, no vocab.json + "
                          f"merges.txt and not exactly one .model/.tiktoken file; point "
                          f"data.tokenizer at the tokenizer file itself")
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer model not found: {path} (data.tokenizer; {_RETRAIN})")
    if path.endswith(".json"):
        obj = _json(path)
        if isinstance(obj, dict) and "model" in obj:
            return "huggingface", _with_config(path)
        if isinstance(obj, dict) and obj and all(isinstance(v, int) for v in obj.values()):
            merges = os.path.join(os.path.dirname(path), "merges.txt")
            if not os.path.isfile(merges):
                raise ConfigError(f"tokenizer {path} is a GPT-2 vocab.json but {merges} is "
                                  f"missing; put the BPE merges file beside it")
            return "gpt2", [path, merges]
        raise ConfigError(f"tokenizer {path} is neither a tokenizers tokenizer.json nor a "
                          f"GPT-2 vocab.json; {_RETRAIN}")
    with open(path, "rb") as f:
        head = f.read(4096).split(b"\n")[:4]
    if path.endswith(".tiktoken") or (head and head[0] and all(
            _TIKTOKEN_LINE.match(x) for x in head[:-1] or head)):
        return "tiktoken", [path]
    return "sentencepiece", [path]


def fingerprint(path: str, kind: str | None = None) -> str | None:
    """sha256 of the tokenizer: of its file when it is one file (so older records match),
    else of its files' names and hashes. None when the path does not exist."""
    if not path or not os.path.exists(path):
        return None
    try:
        files = Tokenizer.files_of(path, kind)
    except ConfigError:
        return sha256(path) if os.path.isfile(path) else None
    if len(files) == 1:
        return sha256(files[0])
    return hashlib.sha256("".join(f"{os.path.basename(p)}\0{sha256(p)}\n"
                                  for p in files).encode()).hexdigest()


class Tokenizer:
    """A loaded tokenizer with ``eod`` (end of document), ``pad`` (NO_PAD if none) and ``bos``
    (None if none) ids.

    Also satisfies what megatron-core's GPTDataset reads from ``config.tokenizer``:
    ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (used in its cache hash).
    """

    def __init__(self, path: str, kind: str | None = None):
        self.path = str(path)
        if kind in (None, "", "auto"):
            kind, files = detect(self.path)
        else:
            if kind not in KINDS:
                raise ConfigError(f"data.tokenizer_type='{kind}' is unknown; choose auto or "
                                  f"one of {', '.join(KINDS)}")
            files = self.files_of(self.path, kind)
        self.kind, self.files = kind, files
        self.bos = self.unk = None
        getattr(self, f"_load_{kind}")(files[0])
        if self.eod is None or self.eod < 0:
            how = ("name it as eos_token in a tokenizer_config.json beside the tokenizer.json"
                   if kind == "huggingface" else f"{_RETRAIN}, which defines one")
            raise ConfigError(f"tokenizer {self.path} ({kind}) has no end-of-document token "
                              f"(eos / {ENDOFTEXT}); {how}")

    @staticmethod
    def files_of(path: str, kind: str | None) -> list[str]:
        got_kind, files = detect(path)
        if kind not in (None, "", "auto") and kind != got_kind and os.path.isfile(path):
            return [path]          # a forced kind reads the file as given
        return files

    # ------------------------------------------------------------------ backends
    def _load_sentencepiece(self, path: str) -> None:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            # SentencePiece raises OSError/RuntimeError (C++ status text) on a bad file.
            ok = sp.Load(path)
        except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConfigError(f"tokenizer {path} is not a valid SentencePiece model ({why}); "
                              f"give data.tokenizer_type if it is another kind, or "
                              f"{_RETRAIN}") from None
        if ok is False or sp.get_piece_size() <= 0:
            raise ConfigError(f"tokenizer model {path} could not be loaded; {_RETRAIN}")
        self._sp = sp
        self.vocab_size = int(sp.get_piece_size())
        self.eod = int(sp.eos_id())
        self.pad = int(sp.pad_id()) if sp.pad_id() >= 0 else NO_PAD
        self.bos = int(sp.bos_id()) if sp.bos_id() >= 0 else None
        self.unk = int(sp.unk_id()) if sp.unk_id() >= 0 else None

    def _load_huggingface(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises Exception subclasses
            raise ConfigError(f"tokenizer {path} is not a valid tokenizers tokenizer.json "
                              f"({str(e).strip()[:200]})") from None
        self._hf = tok
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        conf = _json(os.path.join(os.path.dirname(path), "tokenizer_config.json")) or {}

        def role(key, names):
            want = conf.get(key)
            want = want.get("content") if isinstance(want, dict) else want
            for name in ([want] if want else []) + ([] if want else list(names)):
                i = tok.token_to_id(name)
                if i is not None:
                    return int(i)
            return None
        self.eod = role("eos_token", _EOS_NAMES)
        pad = role("pad_token", _PAD_NAMES)
        self.pad = NO_PAD if pad is None or pad == self.eod else pad
        self.bos = role("bos_token", _BOS_NAMES)

    def _load_gpt2(self, path: str) -> None:
        from tokenizers import ByteLevelBPETokenizer
        vocab, merges = self.files
        try:
            self._hf = ByteLevelBPETokenizer(vocab, merges)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"tokenizer {vocab} + {merges} are not GPT-2 BPE files "
                              f"({str(e).strip()[:200]})") from None
        self.vocab_size = int(self._hf.get_vocab_size())
        self.eod = self._hf.token_to_id(ENDOFTEXT)
        self.pad = NO_PAD

    def _load_tiktoken(self, path: str) -> None:
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe
        except ImportError:
            raise ConfigError("a tiktoken tokenizer needs the tiktoken package: pip install "
                              "tiktoken") from None
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"tokenizer {path} is not a tiktoken encoding file "
                              f"({str(e).strip()[:200]})") from None
        self.eod = max(ranks.values()) + 1
        self._tt = tiktoken.Encoding(os.path.basename(path), pat_str=TIKTOKEN_PATTERN,
                                     mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: self.eod})
        self.vocab_size = self.eod + 1
        self.pad = NO_PAD

    # ------------------------------------------------------------------ use
    @property
    def eos(self) -> int:      # megatron-core's name
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Only what changes dataset samples (pad masking); the token data itself is keyed
        # separately, so the same cache serves any spelling of the model's path. The
        # SentencePiece name is kept so existing index caches stay valid.
        cls = "SentencePieceTokenizer" if self.kind == "sentencepiece" else self.kind
        return OrderedDict(cls=cls, vocab_size=self.vocab_size, eod=self.eod, pad=self.pad)

    def fingerprint(self) -> str:
        return fingerprint(self.path, self.kind)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: no bos/eos added, special-token spellings stay text."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return [list(x) for x in self._sp.encode(list(texts))]
        if self.kind == "tiktoken":
            return self._tt.encode_ordinary_batch(list(texts))
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.DecodeIds(ids)
        if self.kind == "tiktoken":
            return self._tt.decode([i for i in ids if i != self.eod])
        return self._hf.decode(ids, skip_special_tokens=True)

    # DataLoader workers / spawn may pickle the dataset config that holds us.
    def __getstate__(self):
        return {"path": self.path, "kind": self.kind}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("kind"))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"eod={self.eod}, pad={self.pad})")


def load_tokenizer(path: str, kind: str | None = None) -> Tokenizer:
    """Load a tokenizer of any supported kind; ConfigError naming the file if missing or
    unusable."""
    if path in (None, ""):
        raise ConfigError("data.tokenizer is not set: give the tokenizer (a SentencePiece "
                          ".model, a tokenizer.json, GPT-2 vocab.json + merges.txt or a "
                          ".tiktoken file)")
    return Tokenizer(str(path), kind)
