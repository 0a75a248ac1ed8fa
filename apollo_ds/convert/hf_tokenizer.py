"""The run's tokenizer as a transformers fast tokenizer, for the Hugging Face export.

Every kind apollo_ds trains with converts through a library's own converter:

* sentencepiece - transformers' ``SpmConverter`` on the model proto (BPE or Unigram), following
  the model's own normalizer settings;
* huggingface - the ``tokenizer.json`` itself;
* gpt2 - ``tokenizers``' ``ByteLevelBPETokenizer`` on ``vocab.json`` + ``merges.txt``;
* tiktoken - transformers' ``TikTokenConverter`` with the same split pattern and
  ``<|endoftext|>`` id apollo_ds uses.

``check`` reloads the written tokenizer as users will (``AutoTokenizer``) and refuses an export
whose ids differ from the original's on sample texts. No BOS/EOS is added (apollo_ds trains on
raw ``encode()`` ids, EOD-separated); special-token spellings in text stay text, as in training,
except for a ``tokenizer.json``, whose own added-token rules are kept.
"""
from __future__ import annotations

from apollo_ds.config import ConfigError
from apollo_ds.data.tokenizer import ENDOFTEXT, NO_PAD, TIKTOKEN_PATTERN, Tokenizer

# Sample strings for the round-trip check (besides the caller's own text).
SAMPLES = [
    "Hello world! This is a test of the exported tokenizer.",
    "  leading and  double  spaces, trailing space ",
    "digits 1234567890 and 3.14159; punctuation: (a) [b] {c} -- \"quoted\" 'single'",
    "Unicode: caf\u00e9 na\u00efve \u00dcber \u65e5\u672c\u8a9e \u2603 \U0001F600",
    "tab\tseparated\nnew line",
    "",
    " ",
]

_UNREACHABLE = -1e6       # Unigram score for pieces SentencePiece never matches in text

# Text spelling SentencePiece's control and byte pieces: SentencePiece encodes it as text. The
# BPE conversion does too; a Unigram one can pick the control/byte piece when the text's
# characters are not all in the vocabulary (tokenizers' Unigram has no unmatchable pieces), so
# for Unigram a difference here is reported, not refused.
LITERAL_SPECIALS = "<s> and </s> and <unk> and <pad> are text here, as are <0x41> and <0xE2>"


def _spm_proto(path: str):
    from transformers.convert_slow_tokenizer import import_protobuf
    pb = import_protobuf()
    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"tokenizer {path} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise ConfigError(f"tokenizer {path} is not a SentencePiece model (no pieces)")
    return proto


def _spm_backend(path: str):
    from transformers.convert_slow_tokenizer import SpmConverter
    proto = _spm_proto(path)
    kind = proto.trainer_spec.model_type          # 1 unigram, 2 bpe
    if kind == 2:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif kind == 1:
        # SentencePiece never produces unknown, control or byte pieces from matching text
        # ("<s>" or "<0x41>" in text stay text); tokenizers' Unigram would, at their score
        # of 0. Keep them in the vocabulary (ids, byte fallback) but out of reach.
        vocab = [(p.piece, p.score if p.type in (1, 4) else _UNREACHABLE)
                 for p in proto.pieces]
    else:
        raise ConfigError(f"tokenizer {path}: SentencePiece model type {kind} is not "
                          f"supported (bpe or unigram)")
    # legacy=True: SentencePiece's dummy prefix even when the text starts with a space; with
    # special tokens left unsplit (below) there is one chunk, so "always" == "first".
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise ConfigError(f"tokenizer {path}: transformers could not convert it")
    ts = proto.trainer_spec
    specials = {}
    for role, pid, piece in (("bos", ts.bos_id, ts.bos_piece), ("eos", ts.eos_id, ts.eos_piece),
                             ("unk", ts.unk_id, ts.unk_piece), ("pad", ts.pad_id, ts.pad_piece)):
        if pid >= 0:
            specials[f"{role}_token"] = proto.pieces[pid].piece or piece
    return backend, specials


def _backend(tok: Tokenizer):
    """(tokenizers.Tokenizer, special-token kwargs) for a loaded apollo_ds tokenizer."""
    if tok.kind == "sentencepiece":
        return _spm_backend(tok.files[0])
    if tok.kind == "huggingface":
        from tokenizers import Tokenizer as HFTokenizer
        backend = HFTokenizer.from_file(tok.files[0])
    elif tok.kind == "gpt2":
        from tokenizers import ByteLevelBPETokenizer
        backend = ByteLevelBPETokenizer(*tok.files)._tokenizer
    else:
        from transformers.convert_slow_tokenizer import TikTokenConverter
        backend = TikTokenConverter(vocab_file=tok.files[0], pattern=TIKTOKEN_PATTERN,
                                    extra_special_tokens=[ENDOFTEXT]).converted()
    specials = {"eos_token": backend.id_to_token(tok.eod)}
    if tok.bos is not None:
        specials["bos_token"] = backend.id_to_token(tok.bos)
    if tok.pad != NO_PAD:
        specials["pad_token"] = backend.id_to_token(tok.pad)
    return backend, specials


def build(tok: Tokenizer, max_len: int):
    """(transformers fast tokenizer, {role: id}, number of ids) equivalent to ``tok``."""
    from transformers import PreTrainedTokenizerFast
    backend, specials = _backend(tok)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend,
                                 split_special_tokens=tok.kind != "huggingface",
                                 model_max_length=max_len, clean_up_tokenization_spaces=False,
                                 **specials)
    ids = {role[:-len("_token")]: backend.token_to_id(name) for role, name in specials.items()}
    if tok.kind == "sentencepiece":
        n = len(_spm_proto(tok.files[0]).pieces)
    else:
        n = backend.get_vocab_size(with_added_tokens=True)
    if ids.get("eos") != tok.eod:
        raise ConfigError(f"tokenizer {tok.path}: the converted eos id {ids.get('eos')} is not "
                          f"the end-of-document id {tok.eod}")
    return hf, ids, n


def check(out_dir: str, tok: Tokenizer, texts: list[str], log) -> int:
    """Reload the saved tokenizer the way users will and compare its ids with ``tok``'s;
    ConfigError if they differ. Returns the number of texts checked."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    texts = [LITERAL_SPECIALS] + list(texts)
    # a tokenizer.json may add bos/eos by its own post-processor, as the original does
    add = tok.kind != "huggingface"
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()     # texts longer than model_max_length are fine here
    try:
        got_all = [hf.encode(text, add_special_tokens=add) for text in texts]
    finally:
        hf_logging.set_verbosity(level)
    unigram = tok.kind == "sentencepiece" and \
        _spm_proto(tok.files[0]).trainer_spec.model_type == 1
    for text, got in zip(texts, got_all):
        want = tok.encode(text)
        if want != got and text is LITERAL_SPECIALS and unigram:
            log("warning: Unigram tokenizer: text that spells a control or byte piece (e.g. "
                "'<s>') can encode to that piece where SentencePiece spells it out; ordinary "
                "text is unaffected")
            continue
        if want != got:
            raise ConfigError(f"the converted tokenizer encodes {text[:60]!r} to {got[:12]}... "
                              f"but the {tok.kind} original gives {want[:12]}...; this "
                              f"tokenizer's options are not supported by the conversion")
        # SentencePiece spells <unk> as ' \u2047 ', transformers as the piece: ids are what count
        if tok.unk not in want and tok.decode(want) != hf.decode(want,
                                                                skip_special_tokens=True):
            raise ConfigError(f"the converted tokenizer decodes {text[:60]!r} differently "
                              f"from the {tok.kind} original")
    return len(texts)
