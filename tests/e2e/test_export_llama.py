"""Llama (RMSNorm, SwiGLU, rotary, no biases, grouped-query attention with heads 4 / kv_heads 2,
untied output layer) trained for real at TP=2 x ZeRO-2 with Apollo growing the pool 2 -> 4,
exported as LlamaForCausalLM and compared, logits to 1e-4, with apollo_ds's own PoolGPT (TP=1):
the final tag against the live run's gathered weights, the mid-Apollo tag against the live
run's gathered weights right after that checkpoint, both sources independent of the exporter. HF's Llama is an independent implementation of the architecture, so this also
checks the rotary convention, the GQA head grouping and the SwiGLU wiring."""
from __future__ import annotations

import json

import pytest
import torch

from apollo_ds import rundir
from tests.conftest import torchrun, write_config
from tests.e2e.test_export_hf import WORKER, _check_parity, _check_tokenizer, _export

LLAMA = {"arch": "llama", "heads": 4, "kv_heads": 2, "pad_vocab_to": 96}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("export_llama")
    out_dir = tmp / "run"
    cfg = write_config(tmp / "llama.yaml", corpus, model=LLAMA, parallel={"tp": 2},
                       apollo={"enabled": True, "stages": [2, 4], "stage_ends": [2]},
                       train={"steps": 4, "save_interval": 2, "eval_iters": 1,
                              "out_dir": str(out_dir),
                              "deepspeed_config": "ds_configs/zero2_fp32.json"})
    torchrun(2, WORKER, ["--config", str(cfg), "--out", str(tmp / "full.pt"),
                         "--mid", f"2:{tmp / 'mid.pt'}"])
    return {"out_dir": out_dir, "ckpt": out_dir / rundir.CHECKPOINTS,
            "dump": torch.load(tmp / "full.pt"), "mid": torch.load(tmp / "mid.pt")}


def test_llama_export_tp2_zero2_mid_apollo(llama_run, corpus, single_process_group, tmp_path,
                                           monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ck = llama_run["ckpt"]
    final = ck / (ck / rundir.LATEST).read_text().strip()
    state = json.loads((final / rundir.RUN_STATE).read_text())
    assert state["n_unique"] == 4 and state["tp"] == 2 and state["model"]["arch"] == "llama"
    assert "lm_head.weight" in llama_run["dump"]            # untied: its own output layer
    _export(llama_run["out_dir"], tmp_path / "hf", corpus.tokenizer)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["intermediate_size"] == 192        # 8/3 x 64 = 170.7, rounded up to 64s
    _check_parity(tmp_path / "hf", state, llama_run["dump"], arch="LlamaForCausalLM")
    _check_tokenizer(tmp_path / "hf", corpus.tokenizer)

    mid = ck / "step_0000002"
    mid_state = json.loads((mid / rundir.RUN_STATE).read_text())
    assert mid_state["n_unique"] == 2
    _export(mid, tmp_path / "hf_mid", corpus.tokenizer)
    _check_parity(tmp_path / "hf_mid", mid_state, llama_run["mid"],
                  arch="LlamaForCausalLM")
