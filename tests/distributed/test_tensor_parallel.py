"""Tensor parallelism through megatron-core layers: TP=2 and DP=2 x TP=2 reproduce a single
process (losses and final weights, with an Apollo expansion in the run), a vocabulary that TP
does not divide changes nothing, and resume at TP=2 is exact across an expansion."""
import pytest
import torch

from tests.conftest import assert_weights_close, read_metrics, torchrun, write_config

APOLLO = {"enabled": True, "stages": [1, 2, 4], "stage_ends": [5, 8]}


def run(tmp_path, corpus, name, nproc, tp, micro_batch=2, zero=1, apollo=None, model=None,
        **train):
    cfg = write_config(tmp_path / f"{name}.yaml", corpus, apollo={**APOLLO, **(apollo or {})},
                       # 517: not divisible by TP
                       model={"vocab_size": corpus.vocab + 5, **(model or {})},
                       parallel={"tp": tp},
                       train={"steps": 12, "micro_batch": micro_batch,
                              "out_dir": str(tmp_path / name),
                              "deepspeed_config": f"ds_configs/zero{zero}_fp32.json", **train})
    out = tmp_path / f"{name}.pt"
    torchrun(nproc, "tests/distributed/workers/train_and_dump.py",
             ["--config", str(cfg), "--out", str(out)])
    return read_metrics(tmp_path / name), torch.load(out)


def assert_same_run(a, b):
    (ma, wa), (mb, wb) = a, b
    assert [r["n_unique"] for r in ma] == [1] * 5 + [2] * 3 + [4] * 4
    assert [r["layer_maps"] for r in ma] == [r["layer_maps"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
    assert_weights_close(wa, wb, heads=4)


@pytest.fixture(scope="module")
def tp1(corpus, tmp_path_factory):
    return run(tmp_path_factory.mktemp("tp1"), corpus, "tp1", 1, 1, micro_batch=4)


def test_tp2_matches_tp1(tp1, corpus, tmp_path):
    # DP=1 at both sizes: micro_batch 4 so the DP-wide micro-batch equals the DP2 runs' below
    assert_same_run(tp1, run(tmp_path, corpus, "tp2", 2, 2, micro_batch=4))


def test_dp2_tp2_zero1_matches_single_process(tp1, corpus, tmp_path):
    assert_same_run(tp1, run(tmp_path, corpus, "dp2tp2", 4, 2, micro_batch=2))


def test_resume_at_tp2_across_expansion(tp1, corpus, tmp_path):
    run(tmp_path, corpus, "resume", 2, 2, micro_batch=4, stop_after=5)
    assert len(read_metrics(tmp_path / "resume")) == 5
    resumed = run(tmp_path, corpus, "resume", 2, 2, micro_batch=4)
    assert_same_run(tp1, resumed)
    assert [r["step"] for r in resumed[0]] == list(range(1, 13))


def test_llama_gqa_tp2_matches_tp1_across_expansions(corpus, tmp_path):
    # Llama with grouped-query attention: each TP rank holds one of the 2 key/value groups
    # (2 query heads each), half of gate/up/down, and its slice of the untied output layer.
    llama = {"arch": "llama", "heads": 4, "kv_heads": 2}
    one = run(tmp_path, corpus, "llama_tp1", 1, 1, micro_batch=4, model=llama)
    two = run(tmp_path, corpus, "llama_tp2", 2, 2, micro_batch=4, model=llama, zero=2)
    assert "lm_head.weight" in one[1] and "pool.0.gate.weight" in one[1]
    assert_same_run(one, two)


def test_growth_levers_agree_at_tp1_and_tp2(corpus, tmp_path):
    # growth noise is drawn on the full tensor (std of the full tensor) and sliced, so TP=2
    # grows the same weights as TP=1; reset's own param groups and update_scale under TP too
    levers = {"growth_noise": 0.05, "optimizer_state": "reset", "update_scale": "inv_uses"}
    one = run(tmp_path, corpus, "n1", 1, 1, micro_batch=4, apollo=levers)
    two = run(tmp_path, corpus, "n2", 2, 2, micro_batch=4, apollo=levers)
    assert_same_run(one, two)
    plain = run(tmp_path, corpus, "n0", 1, 1, micro_batch=4, apollo={
        "optimizer_state": "reset", "update_scale": "inv_uses"})
    assert plain[0][5]["loss"] != one[0][5]["loss"]   # the noise did change the grown model
