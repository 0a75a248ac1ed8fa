"""Pipeline parallelism through DeepSpeed's PipelineModule: PP=2 reproduces one process (losses
and final weights) across Apollo stages whose unique counts are smaller than, equal to and larger
than the number of pipeline stages ([1, 2, 4] on 2 stages), pool replicas held by several stages
stay bit-identical, resume at PP=2 is exact across an expansion, and TP=2 x PP=2 matches; the
same PP=2 parity for a Llama-style model (grouped-query attention, untied output layer)."""
import pytest
import torch

from apollo_ds.model.pipeline import stage_pool_layers, stage_positions
from tests.conftest import assert_weights_close, read_metrics, torchrun, write_config

APOLLO = {"enabled": True, "stages": [1, 2, 4], "stage_ends": [5, 8]}


def test_stage_split_covers_every_position_once():
    for S in (2, 3, 4):
        for L in range(S, 9):
            for N in range(1, L + 1):
                for d in range(N, L + 1):
                    seq = []
                    for k in range(S):
                        lo, hi = stage_positions(d, S, k)
                        seq += [i * N // d for i in range(lo, hi)]
                        assert set(i * N // d for i in range(lo, hi)) <= set(
                            stage_pool_layers(N, L, S, k))
                    assert seq == [i * N // d for i in range(d)]


LLAMA = {"arch": "llama", "kv_heads": 2}


def run(tmp_path, corpus, name, nproc, pp, tp=1, worker="train_and_dump.py", model=None,
        **train):
    cfg = write_config(tmp_path / f"{name}.yaml", corpus, apollo=APOLLO,
                       model={"vocab_size": corpus.vocab + 5, **(model or {})},
                       parallel={"tp": tp, "pp": pp},
                       train={"steps": 12, "micro_batch": 2, "out_dir": str(tmp_path / name),
                              "eval_interval": 6, **train})
    out = tmp_path / f"{name}.pt"
    torchrun(nproc, f"tests/distributed/workers/{worker}",
             ["--config", str(cfg), "--out", str(out)])
    stages = torch.load(str(out) + ".stages.pt") if pp > 1 else None
    return read_metrics(tmp_path / name), torch.load(out), stages


def assert_same_run(a, b):
    (ma, wa, _), (mb, wb, _) = a, b
    assert [r["n_unique"] for r in ma] == [1] * 5 + [2] * 3 + [4] * 4
    assert [r["n_unique"] for r in mb] == [1] * 5 + [2] * 3 + [4] * 4
    assert [r["layer_maps"] for r in ma] == [r["layer_maps"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5), ra["step"]
        if rb["grad_norm"] is not None:   # DeepSpeed reports no norm under ZeRO-0 fp32
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4), ra["step"]
        if "eval_loss" in ra:
            assert rb["eval_loss"] == pytest.approx(ra["eval_loss"], rel=1e-5), ra["step"]
    assert_weights_close(wa, wb, heads=4)


def assert_replicas_identical(stages, must_share=("word_embeddings.weight",)):
    shared = set()
    for k in stages[0]:
        owners = [sd[k] for sd in stages if k in sd]
        if len(owners) > 1:
            shared.add(k)
        for t in owners[1:]:
            assert torch.equal(t, owners[0]), k
    assert set(must_share) <= shared, (must_share, sorted(shared))


@pytest.fixture(scope="module")
def pp1(corpus, tmp_path_factory):
    return run(tmp_path_factory.mktemp("pp1"), corpus, "pp1", 1, 1, worker="train_and_dump.py")


def test_pp2_matches_single_process(pp1, corpus, tmp_path):
    pp2 = run(tmp_path, corpus, "pp2", 2, 2)
    assert_same_run(pp1, pp2)
    assert_replicas_identical(pp2[2])


def test_pp2_zero0_matches_single_process(pp1, corpus, tmp_path):
    pp2 = run(tmp_path, corpus, "pp2z0", 2, 2, deepspeed_config="ds_configs/zero0_fp32.json")
    assert_same_run(pp1, pp2)
    assert_replicas_identical(pp2[2])


def test_dp2_pp2_matches_single_process(pp1, corpus, tmp_path):
    # 4 processes: micro_batch 1 x DP 2 is the single process's micro-batch of 2
    dp2pp2 = run(tmp_path, corpus, "dp2pp2", 4, 2, micro_batch=1)
    assert_same_run(pp1, dp2pp2)
    assert_replicas_identical(dp2pp2[2])


def test_resume_at_pp2_across_expansion(pp1, corpus, tmp_path):
    # Stops at the last step of the N=1 and N=2 stages, so each resume starts with an
    # expansion; pool layer 0 is replicated on both pipeline stages at N=1 and N=2.
    _, _, stages = run(tmp_path, corpus, "resume", 2, 2, stop_after=5)
    assert len(read_metrics(tmp_path / "resume")) == 5
    assert_replicas_identical(stages, ("word_embeddings.weight", "pool.0.qkv.weight",
                                       "pool.0.fc2.bias"))
    _, _, stages = run(tmp_path, corpus, "resume", 2, 2, stop_after=8)
    assert len(read_metrics(tmp_path / "resume")) == 8
    assert_replicas_identical(stages, ("word_embeddings.weight", "pool.0.qkv.weight",
                                       "pool.0.input_norm.weight"))
    resumed = run(tmp_path, corpus, "resume", 2, 2)
    assert [r["step"] for r in resumed[0]] == list(range(1, 13))
    assert_same_run(pp1, resumed)
    assert_replicas_identical(resumed[2])


def test_tp2_pp2_matches_single_process(pp1, corpus, tmp_path):
    # 4 processes, DP=1: the same micro-batches as the single process
    tp2pp2 = run(tmp_path, corpus, "tp2pp2", 4, 2, tp=2)
    assert_same_run(pp1, tp2pp2)
    assert_replicas_identical(tp2pp2[2])


def test_llama_pp2_matches_single_process_across_resume(corpus, tmp_path):
    # heads 4 / kv_heads 2, RMSNorm, SwiGLU, rotary, untied head: the last stage holds its own
    # lm_head (not a tied replica of the embedding), stage 0 no position table. Stopped at the
    # last N=1 step (pool layer 0 then lives on both stages), resumed into the expansion.
    pp1 = run(tmp_path, corpus, "llama_pp1", 1, 1, model=LLAMA)
    assert "lm_head.weight" in pp1[1] and "position_embeddings.weight" not in pp1[1]
    _, _, stages = run(tmp_path, corpus, "llama_pp2", 2, 2, model=LLAMA, stop_after=5)
    assert_replicas_identical(stages, ("pool.0.gate.weight", "pool.0.qkv.weight",
                                       "pool.0.input_norm.weight"))
    assert "word_embeddings.weight" not in stages[1] and "lm_head.weight" not in stages[0]
    pp2 = run(tmp_path, corpus, "llama_pp2", 2, 2, model=LLAMA)
    assert [r["step"] for r in pp2[0]] == list(range(1, 13))
    assert_same_run(pp1, pp2)
    assert_replicas_identical(pp2[2], ())
