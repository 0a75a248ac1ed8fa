"""train.init_from (apollo_ds/init_from.py): a fresh run from another run's checkpoint or from a
Hugging Face export, weights only; a smaller source fills the pool by the growth map. The
first loss of the new run is checked against the source evaluated independently (the HF
export in transformers, with the layer map the new run uses) on the same samples. Also
train.allow_changes on resume."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from apollo_ds.config import load_config, validate
from tests.conftest import PY, pretrain, read_metrics, run
from tests.e2e.helpers import PRETRAIN, check_ok, tiny_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
    """A 2-layer GPT-2 run trained 4 steps at TP2, and its Hugging Face export."""
    tmp = tmp_path_factory.mktemp("init_src")
    cfg = tiny_config(tmp / "src.yaml", corpus, steps=4, out_dir=str(tmp / "src"))
    pretrain(2, cfg, "parallel.tp=2")
    from apollo_ds.convert.to_hf import main
    assert main(["--checkpoint", str(tmp / "src"), "--output", str(tmp / "hf")]) == 0
    return tmp / "src", tmp / "hf"


def _single(cfg, *overrides) -> list[str]:
    return [PY, PRETRAIN, "--config", str(cfg), *overrides]


def _hf_model(hf_dir, lmap: list[int]):
    """The export, its layers arranged as ``lmap`` (HF layer i = export layer lmap[i])."""
    from transformers import GPT2Config, GPT2LMHeadModel
    src = GPT2LMHeadModel.from_pretrained(hf_dir, dtype=torch.float32)
    conf = GPT2Config.from_pretrained(hf_dir)
    conf.n_layer = len(lmap)
    model = GPT2LMHeadModel(conf)
    sd = {}
    for k, v in src.state_dict().items():
        if k.startswith("transformer.h."):
            _, _, i, rest = k.split(".", 3)
            for j, s in enumerate(lmap):
                if s == int(i):
                    sd[f"transformer.h.{j}.{rest}"] = v
        else:
            sd[k] = v
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def _first_step_loss(model, cfg_path, overrides) -> float:
    """Step 1's loss as the trainer defines it: the mean over its micro-batches (samples
    [j*m, (j+1)*m) of the global batch) of each one's loss_mask-weighted token mean."""
    from apollo_ds.data import build_datasets, get_micro_batch
    cfg = validate(load_config(str(cfg_path), overrides), check_files=False)
    t = cfg.train
    train_ds, _ = build_datasets(cfg, t.steps * t.global_batch, t.eval_iters * t.global_batch)
    losses = []
    with torch.no_grad():
        for start in range(0, t.global_batch, t.micro_batch):
            b = get_micro_batch(train_ds, start, t.micro_batch)
            logits = model(b["tokens"]).logits.float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"].reshape(-1),
                                 reduction="none")
            m = b["loss_mask"].reshape(-1)
            losses.append(float((ce * m).sum() / m.sum()))
    return sum(losses) / len(losses)


def _train_records(out) -> list[dict]:
    return [r for r in read_metrics(out) if r.get("kind", "train") == "train"]


def test_export_into_a_4_layer_apollo_run(source, corpus, tmp_path, single_process_group):
    """Pool 2 at step 1 (apollo.stages [2,4], constant_low: depth 2 = the source's own
    network), the export layer for layer: the first loss is the source's on the same batch;
    training continues through the expansion to 4 unique layers."""
    _, hf = source
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=3, out_dir=str(tmp_path / "run"),
                      init_from=str(hf))
    over = ["model.layers=4", "apollo.enabled=true", "apollo.stages=[2,4]",
            "apollo.stage_ends=[2]", "apollo.sampler=constant_low"]
    r = check_ok(run(_single(cfg, *over)), "init from the export")
    assert (f"initialised from {hf} (Hugging Face GPT2LMHeadModel, 2 unique layers) into a "
            f"pool of 2: layer for layer") in r.stdout
    recs = _train_records(tmp_path / "run")
    assert [x["step"] for x in recs] == [1, 2, 3] and [x["n_unique"] for x in recs] == [2, 2, 4]
    want = _first_step_loss(_hf_model(hf, [0, 1]), cfg, over)
    assert recs[0]["depths"] == [2, 2, 2, 2]
    assert abs(recs[0]["loss"] - want) < 1e-5, (recs[0]["loss"], want)
    assert all(x["loss"] < 7.0 for x in recs) and "done: step 3/3" in r.stdout   # finite


def test_tp2_run_directory_grown_into_4_layers_at_tp1(source, corpus, tmp_path,
                                                      single_process_group):
    """The TP2 run's checkpoint into a 4-layer TP1 run without Apollo: the pool of 4 is filled
    by apollo.grow=interpolate, layer i = source layer floor(i*2/4) = [0,0,1,1]; the first
    loss is the export's network with that layer map, in transformers."""
    run_dir, hf = source
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=2, out_dir=str(tmp_path / "run"),
                      init_from=str(run_dir), init_from_tag="step_0000004")
    over = ["model.layers=4"]
    r = check_ok(run(_single(cfg, *over)), "init from the TP2 run directory")
    assert "into a pool of 4: pool layer i = source layer [0, 0, 1, 1] (interpolate)" in r.stdout
    recs = _train_records(tmp_path / "run")
    want = _first_step_loss(_hf_model(hf, [0, 0, 1, 1]), cfg, over)
    assert abs(recs[0]["loss"] - want) < 1e-5, (recs[0]["loss"], want)
    # weights only: the new run's optimizer and schedule start at step 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" /
                        "params" / "index.json").read_text())
    assert state["optimizer_step"] == 2


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden=128"], "has hidden 64 but this model has model.hidden=128; only the depth "
     "may differ: set it to 64"),
    (["model.arch=llama"], "has arch gpt2 but this model has model.arch=llama; only the depth "
     "may differ: set it to gpt2"),
    (["model.layers=1"], "has 2 unique layers but the pool holds 1 at step 1 (apollo.stages[0],"
     " or model.layers without Apollo); start the pool at >= 2 layers"),
])
def test_shapes_that_cannot_map_are_refused(source, corpus, tmp_path, overrides, message):
    _, hf = source
    cfg = tiny_config(tmp_path / "run.yaml", corpus, out_dir=str(tmp_path / "run"),
                      init_from=str(hf))
    r = run(_single(cfg, *overrides))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: train.init_from={hf} (Hugging Face GPT2LMHeadModel) {message}"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_allow_changes_accepts_a_changed_global_batch(source, corpus, tmp_path):
    _, hf = source
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=4, out_dir=str(tmp_path / "run"))
    check_ok(run(_single(cfg, "train.stop_after=2")), "first half")
    r = run(_single(cfg, "train.global_batch=16"))
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "train.global_batch was 8, this run has 16" in errors[0]
    assert errors[0].endswith("; to change it on purpose, list it in "
                              "train.allow_changes=[global_batch]")
    r = check_ok(run(_single(cfg, "train.global_batch=16", "train.allow_changes=[global_batch]",
                             f"train.init_from={hf}")), "resume with an allowed change")
    assert ("train.global_batch changed on resume: 8 -> 16 (allowed by train.allow_changes)"
            in r.stdout)
    assert f"train.init_from={hf} is ignored" in r.stdout
    recs = _train_records(tmp_path / "run")
    assert [(x["step"], x["tokens"]) for x in recs] == [(1, 256), (2, 256), (3, 512), (4, 512)]


def test_llama_export_with_grouped_query_attention(corpus, tmp_path, single_process_group):
    """A Llama export (2 heads sharing 1 key/value head, untied head) read back through
    hf_llama.from_hf: the first loss is the export's own in transformers."""
    from transformers import LlamaForCausalLM
    llama = {"arch": "llama", "kv_heads": 1}
    src = tiny_config(tmp_path / "src.yaml", corpus, steps=2, out_dir=str(tmp_path / "src"))
    model_over = [f"model.{k}={v}" for k, v in llama.items()]
    check_ok(run(_single(src, *model_over)), "the llama source run")
    from apollo_ds.convert.to_hf import main
    assert main(["--checkpoint", str(tmp_path / "src"), "--output", str(tmp_path / "hf")]) == 0
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=1, out_dir=str(tmp_path / "run"),
                      init_from=str(tmp_path / "hf"))
    r = check_ok(run(_single(cfg, *model_over)), "init from the llama export")
    assert "(Hugging Face LlamaForCausalLM, 2 unique layers)" in r.stdout
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    want = _first_step_loss(hf, cfg, model_over)
    got = _train_records(tmp_path / "run")[0]["loss"]
    assert abs(got - want) < 1e-5, (got, want)
