"""examples/finetune_hf.py: transformers' Trainer finetunes a real apollo_ds export (a tiny
pretraining run with a growth, converted to Hugging Face format) on the ChatterBot corpus
(PyPI chatterbot-corpus 1.3.3, BSD-3-Clause): the held-out answer loss falls, the split is the
documented one, and the finetuned directory is a model `apollo-ds eval` reads."""
from __future__ import annotations

import json
import os
import sys
import zipfile

import pytest
import yaml

from tests.conftest import REPO, pretrain_and_export

sys.path.insert(0, str(REPO / "examples"))
import finetune_hf as ft  # noqa: E402

CACHE = str(REPO / ".cache" / "apollo_ds" / "data" / "downloads")


@pytest.fixture(scope="module")
def export(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("finetune")
    pretrain_and_export(tmp, corpus)
    return tmp


def test_split_is_every_tenth_conversation_of_each_file():
    wheel = ft.fetch(CACHE)
    data = ft.load_pairs(wheel)
    # counted here from the YAML files themselves: conversations with two text turns
    train = test = 0
    with zipfile.ZipFile(wheel) as z:
        for n in z.namelist():
            if n.startswith("chatterbot_corpus/data/english/") and n.endswith(".yml"):
                convs = [c for c in yaml.safe_load(z.read(n))["conversations"]
                         if isinstance(c, list) and len(c) >= 2
                         and all(isinstance(t, str) for t in c[:2])]
                test += (len(convs) + 9) // 10
                train += len(convs) - (len(convs) + 9) // 10
    assert (len(data["train"]), len(data["test"])) == (train, test)
    assert train > 1000 and {e["category"] for e in data["test"]} >= {"greetings", "science"}
    assert data["test"][0]["question"] and data["test"][0]["answer"]


def test_finetuning_lowers_the_held_out_answer_loss(export, capsys):
    out = export / "ft"
    rc = ft.main(["--model", str(export / "hf"), "--output", str(out), "--data-dir", CACHE,
                  "--max-steps", "12", "--lr", "3e-3", "--batch-size", "16",
                  "--log-every", "4"])
    assert rc == 0
    rep = json.loads((out / "finetune_report.json").read_text())
    assert rep["steps"] == 12
    assert rep["after"]["loss"] < rep["before"]["loss"] - 0.2, rep
    assert rep["before"]["tokens"] == rep["after"]["tokens"] > 0
    printed = capsys.readouterr().out
    assert f"before: held-out answer loss {rep['before']['loss']:.4f}" in printed
    # the training loss logged by the Trainer fell too
    hist = [h["loss"] for h in rep["history"]]
    assert hist[-1] < hist[0]
    # the finetuned directory is a model the eval command reads
    assert os.path.isfile(out / "config.json") and (out / "chat_test.txt").read_text().count(
        "\n") == rep["data"]["test"]


def test_missing_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ft.main(["--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "no config.json there; export a run first" in capsys.readouterr().err
