"""TP-consistent randomness over gloo processes: TP=2 with dropout 0.1 for 10 steps across an
Apollo expansion, every parameter TP replicates is bit-identical on both TP ranks (shared
activations drew the same dropout masks), with and without train.recompute=full. Recompute
against none (losses and gradients, every ZeRO stage, TP2, PP2, dropout, bf16) is
test_recompute_matrix.py."""
import json

import pytest

from tests.conftest import read_metrics, torchrun, write_config

APOLLO = {"enabled": True, "stages": [1, 2, 4], "stage_ends": [4, 7]}   # expands after 4, 7


def _run(tmp_path, corpus, name, nproc, worker, parallel, model=None, **train):
    cfg = write_config(tmp_path / f"{name}.yaml", corpus, apollo=APOLLO,
                       model={"vocab_size": corpus.vocab, **(model or {})}, parallel=parallel,
                       train={"steps": 10, "micro_batch": 2, "out_dir": str(tmp_path / name),
                              **train})
    out = tmp_path / f"{name}.out"
    torchrun(nproc, f"tests/distributed/workers/{worker}",
             ["--config", str(cfg), "--out", str(out)])
    return read_metrics(tmp_path / name), out


def test_tp2_dropout_keeps_replicated_parameters_identical(corpus, tmp_path):
    recs, out = _run(tmp_path, corpus, "tp2", 2, "tp_replicas.py", {"tp": 2},
                     model={"dropout": 0.1})
    assert [r["n_unique"] for r in recs] == [1] * 4 + [2] * 3 + [4] * 3
    diffs = json.loads(out.read_text())
    # norms (2 per layer + final), row-parallel biases (2 per layer), position embeddings
    assert len(diffs) == 4 * 6 + 2 + 1, sorted(diffs)
    assert any(k.endswith("proj.bias") for k in diffs)
    assert all(v == 0.0 for v in diffs.values()), {k: v for k, v in diffs.items() if v}
    # with recompute too (the recomputed shared-activation masks are the forward's), and the
    # same losses
    again, out2 = _run(tmp_path, corpus, "tp2rc", 2, "tp_replicas.py", {"tp": 2},
                       model={"dropout": 0.1}, recompute="full")
    for a, b in zip(recs, again):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), a["step"]
    assert all(v == 0.0 for v in json.loads(out2.read_text()).values())


def test_dropout_changes_the_run(corpus, tmp_path):
    """The dropout test above must not pass vacuously: dropout 0.1 changes the losses."""
    a, _ = _run(tmp_path, corpus, "d0", 1, "train_and_dump.py", {"tp": 1}, eval_iters=1)
    b, _ = _run(tmp_path, corpus, "d1", 1, "train_and_dump.py", {"tp": 1},
                model={"dropout": 0.1}, eval_iters=1)
    assert a[0]["loss"] != b[0]["loss"]

