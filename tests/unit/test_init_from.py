"""The exporter's mappers run backwards (convert/hf_gpt2.from_hf, hf_llama.from_hf) give back
every apollo_ds tensor exactly, and init_from.check refuses what cannot map."""
from __future__ import annotations

import pytest
import torch

from apollo_ds import init_from
from apollo_ds.config import ConfigError, RunConfig, ffn_width, model_config_of
from apollo_ds.convert import hf_gpt2, hf_llama


def _full(model: dict, n: int) -> dict:
    """Random canonical tensors of a pool of ``n`` layers (shapes as PoolGPT's, full)."""
    m = model_config_of(model)
    h, g = m.hidden, torch.Generator().manual_seed(0)
    kv = m.kv_heads or m.heads
    qkv = (m.heads + 2 * kv) * (h // m.heads)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    out = {"word_embeddings.weight": r(m.vocab_size, h), "final_norm.weight": r(h)}
    for j in range(n):
        p = f"pool.{j}."
        out.update({p + "qkv.weight": r(qkv, h), p + "proj.weight": r(h, h),
                    p + "input_norm.weight": r(h), p + "mlp_norm.weight": r(h),
                    p + "fc2.weight": r(h, ffn_width(m))})
        if m.arch == "llama":
            out.update({p + "gate.weight": r(ffn_width(m), h), p + "up.weight": r(ffn_width(m), h)})
        else:
            out.update({p + "qkv.bias": r(qkv), p + "proj.bias": r(h), p + "input_norm.bias": r(h),
                        p + "mlp_norm.bias": r(h), p + "fc1.weight": r(ffn_width(m), h),
                        p + "fc1.bias": r(ffn_width(m)), p + "fc2.bias": r(h)})
    if m.arch == "gpt2":
        out.update({"position_embeddings.weight": r(m.seq_len, h), "final_norm.bias": r(h)})
    else:
        out["lm_head.weight"] = r(m.vocab_size, h)
    return out


@pytest.mark.parametrize("mapper, model", [
    (hf_gpt2, {"arch": "gpt2", "layers": 2, "hidden": 16, "heads": 4, "seq_len": 8,
               "vocab_size": 32, "ffn_mult": 4}),
    (hf_llama, {"arch": "llama", "layers": 2, "hidden": 16, "heads": 4, "kv_heads": 2,
                "seq_len": 8, "vocab_size": 32, "tie_embeddings": False}),
])
def test_inverse_mapper_round_trip(mapper, model):
    full = _full(model, 2)
    hf = mapper.hf_state(full, model, 2, [0, 1])
    for name, want in full.items():
        layer = None
        rest = name
        if name.startswith("pool."):
            _, j, rest = name.split(".", 2)
            layer = int(j)
        got = mapper.from_hf(rest, layer, hf.__getitem__, model)
        assert torch.equal(got, want), name


def test_hf_config_read_back():
    from transformers import LlamaConfig
    model = {"arch": "llama", "layers": 3, "hidden": 64, "heads": 4, "kv_heads": 2,
             "seq_len": 32, "vocab_size": 100, "ffn_hidden": 96, "rope_theta": 500.0,
             "tie_embeddings": False}
    conf = hf_llama.hf_config(model, {}).to_dict()
    assert isinstance(hf_llama.hf_config(model, {}), LlamaConfig)
    back = hf_llama.model_of_hf(conf)
    assert {k: back[k] for k in model} == model
    g = {"arch": "gpt2", "layers": 2, "hidden": 32, "heads": 2, "seq_len": 16,
         "vocab_size": 50, "ffn_mult": 4}
    back = hf_gpt2.model_of_hf(hf_gpt2.hf_config(g, {}).to_dict())
    assert {k: back[k] for k in g} == g


def _cfg(**model) -> RunConfig:
    cfg = RunConfig()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.apollo.stages = [cfg.model.layers]
    cfg.train.init_from = "SRC"
    return cfg


def test_check_refusals():
    src = init_from.Source("SRC", "test", {"arch": "gpt2", "layers": 2, "hidden": 128,
                                            "heads": 4, "seq_len": 128, "vocab_size": 4096},
                           2, None)
    init_from.check(src, _cfg(vocab_size=4096, layers=4))       # deeper: fine
    with pytest.raises(ConfigError, match=r"^train.init_from=SRC \(test\) has a vocabulary of "
                       r"4096 but model.vocab_size=2048; set model.vocab_size >= 4096$"):
        init_from.check(src, _cfg(vocab_size=2048))
    with pytest.raises(ConfigError, match=r"has 128 learned positions but model.seq_len=256"):
        init_from.check(src, _cfg(vocab_size=4096, seq_len=256))
    with pytest.raises(ConfigError, match=r"has MLP width 512 but this model has the MLP width "
                       r"\(model.ffn_mult / model.ffn_hidden\) 256"):
        init_from.check(src, _cfg(vocab_size=4096, ffn_mult=2))


@pytest.mark.parametrize("overrides, message", [
    (["train.allow_changes=[model]"], "train.allow_changes=['model']: model cannot be allowed; "
     "choose from data, tokenizer, global_batch, seed (the model and the Apollo schedule never "
     "change on resume)"),
    (["train.init_from_tag=step_0000004"], "train.init_from_tag=step_0000004 needs "
     "train.init_from (the run directory)"),
])
def test_settings_refused(overrides, message):
    from apollo_ds.config import load_config, validate
    with pytest.raises(ConfigError) as e:
        validate(load_config(None, overrides), check_files=False)
    assert str(e.value) == message


def test_missing_source_is_refused(tmp_path):
    from apollo_ds.config import load_config, validate
    cfg = validate(load_config(None, [f"train.init_from={tmp_path}/nope"]), check_files=False)
    with pytest.raises(ConfigError) as e:
        init_from.open_source(cfg)
    assert str(e.value) == (f"train.init_from={tmp_path}/nope: no such directory; give a run's "
                            f"train.out_dir, a checkpoint tag directory or a Hugging Face export")
    (tmp_path / "empty").mkdir()
    cfg.train.init_from = str(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"^train.init_from: no `latest` file in "):
        init_from.open_source(cfg)
