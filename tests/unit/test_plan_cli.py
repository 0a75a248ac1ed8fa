"""`apollo-ds plan` run in-process: stage ranges, pmfs, relative FLOPs, error exit."""
import json

import pytest

from apollo_ds.apollo import depth_pmf
from apollo_ds.cli import main
from apollo_ds.flops import forward_flops_per_token

YAML = """\
model: {layers: 12, hidden: 64, heads: 4, seq_len: 32, vocab_size: 100, pad_vocab_to: 1}
apollo: {enabled: true, stages: [1, 3, 6, 12], stage_ends: [0.05, 0.10, 0.25], sampler: lvps}
train: {steps: 400, micro_batch: 2, global_batch: 8}
"""


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text(YAML)            # no data, tokenizer or DeepSpeed config exists: plan needs none
    return str(p)


def _plan_json(capsys, *argv):
    assert main(["plan", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_with_apollo(config, capsys):
    out = _plan_json(capsys, "--config", config, "--json")
    assert out["steps"] == 400
    st = out["stages"]
    assert [(s["index"], s["unique"], s["start_step"], s["end_step"]) for s in st] == [
        (0, 1, 1, 20), (1, 3, 21, 40), (2, 6, 41, 100), (3, 12, 101, 400)]
    for s in st:
        pmf = {int(k): v for k, v in s["depth_pmf"].items()}
        assert sorted(pmf) == list(range(s["unique"], 13))
        assert sum(pmf.values()) == pytest.approx(1.0)
        assert pmf == pytest.approx(depth_pmf("lvps", 12, s["unique"]))
        assert s["expected_depth"] == pytest.approx(sum(k * p for k, p in pmf.items()))
    assert st[0]["expected_depth"] == pytest.approx(1.77, abs=0.02)
    assert st[3]["relative_flops"] == 1.0
    # hand check: FLOPs are affine in depth, so stage cost = f(E[d]) / f(12)
    f = lambda d: forward_flops_per_token(64, 32, 100, d)
    for s in st:
        assert s["relative_flops"] == pytest.approx(f(s["expected_depth"]) / f(12))
    total = sum((s["end_step"] - s["start_step"] + 1) * s["relative_flops"] for s in st) / 400
    assert out["relative_flops"] == pytest.approx(total)
    assert 0.75 < out["relative_flops"] < 1.0     # 75% of the run is full depth


def test_plan_without_apollo_is_full_cost(config, capsys):
    out = _plan_json(capsys, "--config", config, "--json", "apollo.enabled=false")
    assert len(out["stages"]) == 1
    assert out["stages"][0]["depth_pmf"] == {"12": 1.0}
    assert (out["stages"][0]["start_step"], out["stages"][0]["end_step"]) == (1, 400)
    assert out["relative_flops"] == 1.0


def test_overrides_before_and_after_json(config, capsys):
    out = _plan_json(capsys, "--config", config, "model.layers=6", "--json",
                     "apollo.stages=[1,2,6]", "apollo.stage_ends=[10,50]", "train.steps=100")
    assert [(s["unique"], s["start_step"], s["end_step"]) for s in out["stages"]] == [
        (1, 1, 10), (2, 11, 50), (6, 51, 100)]
    assert out["stages"][1]["expected_depth"] == pytest.approx(2.53, abs=0.02)


def test_plan_table(config, capsys):
    assert main(["plan", "--config", config]) == 0
    text = capsys.readouterr().out
    assert "101-400" in text and "1:0.736" in text and "12:1.000" in text
    assert "relative to full depth" in text


def test_bad_sampler_exits_2(config, capsys):
    assert main(["plan", "--config", config, "apollo.sampler=bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "apollo.sampler" in err


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["plan", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
