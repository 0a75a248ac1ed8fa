"""Train a tokenizer for apollo_ds: SentencePiece (BPE or Unigram) or a byte-level BPE.

    apollo-ds train-tokenizer --input corpus.txt --vocab-size 8192 \
        --model-prefix data/spm8k [--model-type bpe|unigram|byte-bpe] [--input-sentence-size K]

bpe / unigram (SentencePiece) write PREFIX.model and PREFIX.vocab. Fixed ids: pad=0, unk=1,
bos=2, eos=3 (eos is the end-of-document token appended by apollo-ds preprocess --append-eod).
byte_fallback is on, so any text encodes without <unk>; normalization is the identity, so
decode(encode(x)) == x.

byte-bpe (the ``tokenizers`` library's byte-level BPE, GPT-2's scheme) writes PREFIX.json, a
tokenizer.json with <|endoftext|>=0 (end of document), <pad>=1 and <s>=2 (bos).
Input: plain text, one sentence/document per line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
BYTE_SPECIALS = ["<|endoftext|>", "<pad>", "<s>"]
PROG = ["train_tokenizer.py"]      # the name errors carry: the entry point's


def fail(msg: str) -> None:
    print(f"{PROG[0]}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG[0], description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="text files, one sentence or document per line")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N")
    p.add_argument("--model-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.model and PREFIX.vocab (byte-bpe: PREFIX.json)")
    p.add_argument("--model-type", choices=("bpe", "unigram", "byte-bpe"), default="bpe",
                   help="SentencePiece bpe/unigram, or tokenizers' byte-level BPE")
    p.add_argument("--input-sentence-size", type=int, default=0, metavar="K",
                   help="train on a random sample of K lines (0: all lines)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    return p.parse_args(argv)


def has_text(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def train_byte_bpe(args) -> int:
    from tokenizers import ByteLevelBPETokenizer
    t0 = time.time()
    tok = ByteLevelBPETokenizer()
    tok.train(list(args.input), vocab_size=args.vocab_size, special_tokens=BYTE_SPECIALS,
              show_progress=args.verbose)
    tok.save(args.model_prefix + ".json")
    print(f"{PROG[0]}: wrote {args.model_prefix}.json: {tok.get_vocab_size()} tokens "
          f"(byte-level BPE), "
          f"<|endoftext|>=0 <pad>=1 <s>=2, {time.time() - t0:.1f} s")
    return 0


def main(argv=None, prog: str = "train_tokenizer.py") -> int:
    PROG[0] = prog
    args = parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            fail(f"input file not found: {path}")
        if "," in path:
            fail(f"input path contains a comma, which SentencePiece cannot take: {path}")
    if not any(has_text(path) for path in args.input):
        fail(f"input is empty (no non-blank lines in {', '.join(args.input)})")
    # 4 special pieces + 256 byte pieces are always in the vocabulary (plus the characters
    # of the text; SentencePiece says how many when that is the problem).
    if args.vocab_size <= 260:
        fail(f"--vocab-size {args.vocab_size} is too small: the special and 256 byte "
             f"pieces alone take about 260")
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    if args.model_type == "byte-bpe":
        return train_byte_bpe(args)

    import sentencepiece as spm

    t0 = time.time()
    print(f"{PROG[0]}: training {args.model_type} tokenizer, vocab {args.vocab_size}, on "
          f"{', '.join(args.input)}", file=sys.stderr)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(args.input),
            model_prefix=args.model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            byte_fallback=True,
            character_coverage=args.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 15,     # documents are whole lines of a few KB
            num_threads=max(1, args.threads),
            minloglevel=0 if args.verbose else 1,
        )
    except (RuntimeError, OSError) as e:
        fail(f"SentencePiece refused the training run: {str(e).strip()}")
    sp = spm.SentencePieceProcessor(model_file=args.model_prefix + ".model")
    print(f"{PROG[0]}: wrote {args.model_prefix}.model and .vocab: {sp.get_piece_size()} pieces "
          f"({args.model_type}), pad={sp.pad_id()} unk={sp.unk_id()} bos={sp.bos_id()} "
          f"eos={sp.eos_id()}, {time.time() - t0:.1f} s")
    return 0

