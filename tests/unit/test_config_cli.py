"""`apollo-ds config`: every setting of RunConfig, once, with its default and a meaning read from
config.py's comments (a new field without one fails here), and a preset's values."""
from __future__ import annotations

import dataclasses
import json

from apollo_ds.config import RunConfig, load_config


def _all_fields() -> dict:
    cfg = RunConfig()
    return {f"{sec.name}.{f.name}": getattr(getattr(cfg, sec.name), f.name)
            for sec in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(type(getattr(cfg, sec.name)))}


def test_every_setting_listed_with_default_and_meaning(capsys):
    from apollo_ds.cli import main
    assert main(["config", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["default"] for r in rows} == json.loads(json.dumps(_all_fields()))
    assert len(rows) == len(_all_fields())
    undocumented = [r["name"] for r in rows if len(r["meaning"]) < 8 and not r["choices"]]
    assert undocumented == []
    by = {r["name"]: r for r in rows}
    assert by["data.tokenizer_type"]["choices"] == ["auto", "sentencepiece", "huggingface",
                                                     "gpt2", "tiktoken"]
    assert by["train.warmup"]["meaning"] == "fraction of steps (<1) or a number of steps (>=1)"
    # a continuation of the field above is not taken for this field's meaning
    assert by["train.rewarmup_steps"]["meaning"].startswith(">0: after each expansion")


def test_preset_values_and_sections(capsys):
    from apollo_ds.cli import main
    preset = "configs/recommended_grow_tiny.yaml"
    assert main(["config", "apollo", "--config", preset]) == 0
    out = capsys.readouterr().out
    want = load_config(preset, []).apollo
    assert f"apollo.stages = []   (this config: {json.dumps(want.stages)})" in out
    assert "apollo.sampler = \"lvps\"   (this config: \"constant_low\")" in out
    names = [ln.split(" = ")[0] for ln in out.splitlines() if not ln.startswith(" ")]
    assert names == [f"apollo.{f.name}" for f in dataclasses.fields(want)]
    assert main(["config", "nope"]) == 2
    assert capsys.readouterr().err.strip() == ("apollo-ds config: error: no section nope; "
                                               "choose from apollo, data, model, parallel, "
                                               "train")
