"""SentencePiece tokenizer wrapper: the few things training and megatron-core datasets need.

Kept free of torch/megatron imports so data_prep scripts can refuse bad inputs quickly.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from apollo_ds.config import ConfigError

_RETRAIN = "train one with data_prep/train_tokenizer.py"


class Tokenizer:
    """A loaded SentencePiece model with ``eod`` (= eos) and ``pad`` ids.

    Also satisfies what megatron-core's GPTDataset reads from ``config.tokenizer``:
    ``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers`` (used in its cache hash).
    """

    def __init__(self, path: str):
        import sentencepiece as spm

        self.path = path
        if not os.path.isfile(path):
            raise ConfigError(f"tokenizer model not found: {path} ({_RETRAIN})")
        sp = spm.SentencePieceProcessor()
        try:
            # SentencePiece raises OSError/RuntimeError (C++ status text) on a bad file.
            ok = sp.Load(path)
        except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
            why = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ConfigError(f"tokenizer model {path} is not a valid SentencePiece model "
                              f"({why}); {_RETRAIN}") from None
        if ok is False or sp.get_piece_size() <= 0:
            raise ConfigError(f"tokenizer model {path} could not be loaded; {_RETRAIN}")
        self._sp = sp
        self.vocab_size = int(sp.get_piece_size())
        self.eod = int(sp.eos_id())
        self.pad = int(sp.pad_id())
        self.bos = int(sp.bos_id())
        self.unk = int(sp.unk_id())
        if self.eod < 0 or self.pad < 0:
            raise ConfigError(f"tokenizer model {path} has no eos and/or pad piece "
                              f"(eos_id={self.eod}, pad_id={self.pad}); {_RETRAIN}, which "
                              f"defines both")

    # megatron-core names
    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        # Only what changes dataset samples (pad masking); the token data itself is keyed
        # separately, so the same cache serves any spelling of the model's path.
        return OrderedDict(cls="SentencePieceTokenizer", vocab_size=self.vocab_size,
                           eod=self.eod, pad=self.pad)

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    # DataLoader workers / spawn may pickle the dataset config that holds us.
    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod}, "
                f"pad={self.pad})")


def load_tokenizer(path: str) -> Tokenizer:
    """Load a SentencePiece ``.model``; ConfigError naming the file if missing or corrupt."""
    if path in (None, ""):
        raise ConfigError("data.tokenizer is not set: give the SentencePiece .model file")
    return Tokenizer(str(path))
