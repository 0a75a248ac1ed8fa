"""Hugging Face export (python -m apollo_ds.convert.to_hf) from real 2-process runs.

The fast case trains TP=2 x ZeRO-2 (fp32, vocabulary padded) with Apollo growing the pool
2 -> 4, checkpointing before and after the growth. The export of each tag is loaded with
AutoModelForCausalLM / AutoTokenizer (offline) and compared with apollo_ds's own PoolGPT in
this process (TP=1), whose weights come from sources independent of the exporter:

- the final tag: the live run's gathered weights (train_and_dump.py: full_state_dict of the
  trained model, written by rank 0 after the last checkpoint);
- the mid-Apollo tag (2 unique layers): the live run's gathered weights right after that
  checkpoint (train_and_dump.py --mid); PoolGPT runs it at full depth with
  layer_map(2, 4) = [0, 0, 1, 1].

The slow case does the same for ZeRO-3 with data parallelism (TP=1, DP=2).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from apollo_ds import rundir
from tests.conftest import real_text_lines, torchrun, write_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")

WORKER = "tests/distributed/workers/train_and_dump.py"
ATOL = 1e-4
# Texts the tokenizer conversion has to get exactly right besides the corpus lines.
EDGE_TEXTS = ["", " ", "  two  spaces  ", " leading", "trailing ", "tab\tand\nnewline",
              "digits 0123456789 3.14", "caf\u00e9 \u65e5\u672c \U0001F600", "<s> </s> <pad>"]


def _train(tmp_path: Path, corpus, name: str, tp: int, zero: int) -> dict:
    out_dir = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", corpus,
                       model={"pad_vocab_to": 96},        # 512 -> 576 rows: padding to drop
                       parallel={"tp": tp},
                       apollo={"enabled": True, "stages": [2, 4], "stage_ends": [2]},
                       train={"steps": 4, "save_interval": 2, "eval_iters": 1,
                              "out_dir": str(out_dir),
                              "deepspeed_config": f"ds_configs/zero{zero}_fp32.json"})
    dump, mid = tmp_path / f"{name}_full.pt", tmp_path / f"{name}_mid.pt"
    torchrun(2, WORKER, ["--config", str(cfg), "--out", str(dump), "--mid", f"2:{mid}"])
    ckpt = out_dir / rundir.CHECKPOINTS
    return {"out_dir": out_dir, "ckpt": ckpt, "dump": torch.load(dump),
            "mid": torch.load(mid),
            "latest": (ckpt / rundir.LATEST).read_text().strip()}


def _export(src: Path, dst: Path, tokenizer: str, *extra: str) -> None:
    from apollo_ds.convert.to_hf import main
    assert main(["--checkpoint", str(src), "--output", str(dst), "--tokenizer", tokenizer,
                 *extra]) == 0


def _pool_model(run_state: dict, full: dict):
    """apollo_ds's PoolGPT (TP=1) holding ``full`` (unpadded vocabulary)."""
    from apollo_ds.config import ModelConfig
    from apollo_ds.model.gpt import PoolGPT
    cfg = ModelConfig(**run_state["model"])
    model = PoolGPT(cfg, run_state["n_unique"]).eval()
    sd = {}
    for name, p in model.named_parameters():
        t = full[name].float()
        if t.shape[0] < p.shape[0]:     # vocabulary rows: re-pad (padded rows are masked)
            t = torch.cat([t, t.new_zeros(p.shape[0] - t.shape[0], t.shape[1])])
        sd[name] = t
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if not k.endswith("_extra_state")] and not unexpected
    return model, cfg


def _token_batch(tok, seq_len: int) -> torch.Tensor:
    rows = [ids for ids in (tok.encode(t, truncation=True, max_length=seq_len)
                            for t in real_text_lines(50)) if len(ids) == seq_len][:3]
    return torch.tensor(rows)


def _check_parity(hf_dir: Path, run_state: dict, full: dict, arch: str = "GPT2LMHeadModel"
                  ) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ds.apollo.layer_maps import layer_map
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert type(hf).__name__ == arch
    m = run_state["model"]
    assert hf.config.num_hidden_layers == m["layers"] and hf.config.vocab_size == m["vocab_size"]
    tied = hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    assert tied == (arch == "GPT2LMHeadModel")          # llama: an untied output layer
    ref, cfg = _pool_model(run_state, full)
    tokens = _token_batch(tok, cfg.seq_len)
    assert tokens.shape == (3, cfg.seq_len)
    lmap = layer_map(run_state["n_unique"], cfg.layers)
    with torch.no_grad():
        want = ref(tokens, lmap)[..., :cfg.vocab_size].float()
        got = hf(tokens).logits.float()
    diff = (got - want).abs().max().item()
    print(f"{hf_dir.name}: N={run_state['n_unique']} map={lmap} max|logits diff| = {diff:.3e}")
    assert torch.isfinite(got).all()
    assert diff <= ATOL, f"{hf_dir}: logits differ from PoolGPT by {diff:.3g}"
    return diff


def _check_tokenizer(hf_dir: Path, spm_path: str) -> None:
    import sentencepiece as spm
    from transformers import AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    texts = real_text_lines(300) + EDGE_TEXTS
    got = tok(texts, add_special_tokens=True)["input_ids"]
    bad = [t for t, g in zip(texts, got) if g != sp.encode(t)]
    assert not bad, f"{len(bad)} texts encode differently, e.g. {bad[0][:80]!r}"
    ids = sp.encode(texts[0])
    assert tok.decode(ids) == sp.decode(ids) == texts[0]
    assert (tok.eos_token_id, tok.pad_token_id) == (sp.eos_id(), sp.pad_id())


def _show(capsys) -> str:
    """Pass captured output through (the exporter's progress lines, the parity numbers)."""
    _show.last = capsys.readouterr().out
    with capsys.disabled():
        print(_show.last, end="")
    return _show.last


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, corpus):
    return _train(tmp_path_factory.mktemp("export_tp2"), corpus, "tp2_zero2", tp=2, zero=2)


def test_export_tp2_zero2_apollo(tp2_run, corpus, single_process_group, tmp_path, monkeypatch,
                                 capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tp2_run
    final_state = json.loads((run["ckpt"] / run["latest"] / rundir.RUN_STATE).read_text())
    assert final_state["n_unique"] == 4 and final_state["tp"] == 2

    # Final tag, addressed by the run's out_dir (the tag comes from `latest`).
    hf_final = tmp_path / "hf_final"
    _export(run["out_dir"], hf_final, corpus.tokenizer)
    _show(capsys)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in hf_final.iterdir()}
    _check_parity(hf_final, final_state, run["dump"])
    _check_tokenizer(hf_final, corpus.tokenizer)

    # Mid-Apollo tag (pool of 2 for 4 layers), addressed by its tag directory.
    mid = run["ckpt"] / "step_0000002"
    mid_state = json.loads((mid / rundir.RUN_STATE).read_text())
    assert mid_state["n_unique"] == 2
    hf_mid = tmp_path / "hf_mid"
    _export(mid, hf_mid, corpus.tokenizer)
    assert "full-depth" in _show(capsys) and "[0, 0, 1, 1]" in _show.last
    _check_parity(hf_mid, mid_state, run["mid"])
    _show(capsys)


def test_export_refusals(tp2_run, corpus, tmp_path, capsys):
    from apollo_ds.convert.to_hf import main

    def refused(src, *extra) -> str:
        capsys.readouterr()
        rc = main(["--checkpoint", str(src), "--output", str(tmp_path / "out"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("to_hf: error: ") and err.count("\n") == 1, err
        return err

    tok = ["--tokenizer", corpus.tokenizer]
    assert "does not exist" in refused(tmp_path / "nope", *tok)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no `latest` file" in refused(empty, *tok)
    # A copied tag whose rank-1 state file never got written.
    broken = tmp_path / "broken"
    shutil.copytree(run_tag := tp2_run["ckpt"] / tp2_run["latest"], broken)
    (broken / rundir.PARAMS / "rank_00001.bin").unlink()
    err = refused(broken, *tok)
    assert "incomplete" in err and "params/rank_00001.bin" in err
    # No run_state.json: an interrupted save.
    (broken / rundir.RUN_STATE).unlink()
    (tmp_path / "ck").mkdir()
    shutil.move(str(broken), tmp_path / "ck" / "step_1")
    (tmp_path / "ck" / rundir.LATEST).write_text("step_1")
    assert "incomplete" in refused(tmp_path / "ck", *tok)
    # A run_state without a recorded tokenizer (older runs): --tokenizer is required and says so.
    old = tmp_path / "old" / "step_1"
    shutil.copytree(run_tag, old)
    state = json.loads((old / rundir.RUN_STATE).read_text())
    state.pop("data", None)
    (old / rundir.RUN_STATE).write_text(json.dumps(state))
    (old / rundir.MANIFEST).unlink()                 # older runs wrote no manifest either
    (tmp_path / "old" / rundir.LATEST).write_text("step_1")
    assert "--tokenizer" in refused(tmp_path / "old")
    # Written before the layout-free params/ copy: DeepSpeed's own files are not read any more.
    older = tmp_path / "older" / "step_1"
    shutil.copytree(run_tag, older)
    shutil.rmtree(older / rundir.PARAMS)
    (older / rundir.MANIFEST).unlink()
    assert refused(older, *tok) == (
        f"to_hf: error: checkpoint {older} has no layout-free params/ copy (written by an older "
        f"version); resume it once with this version and let it save, then use the new "
        f"checkpoint\n")


@pytest.mark.slow
def test_export_zero3_dp2(tmp_path, corpus, single_process_group, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = _train(tmp_path, corpus, "dp2_zero3", tp=1, zero=3)
    state = json.loads((run["ckpt"] / run["latest"] / rundir.RUN_STATE).read_text())
    assert state["dp"] == 2 and state["n_unique"] == 4
    hf_dir = tmp_path / "hf"
    _export(run["ckpt"], hf_dir, corpus.tokenizer)
    _check_parity(hf_dir, state, run["dump"])
    # The mid-Apollo ZeRO-3 tag exports at full depth with each pool layer used twice.
    from safetensors.torch import load_file
    _export(run["ckpt"] / "step_0000002", tmp_path / "hf_mid", corpus.tokenizer)
    w = load_file(tmp_path / "hf_mid" / "model.safetensors")
    key = "transformer.h.{}.attn.c_attn.weight"
    assert torch.equal(w[key.format(0)], w[key.format(1)])
    assert torch.equal(w[key.format(2)], w[key.format(3)])
    assert not torch.equal(w[key.format(1)], w[key.format(2)])
