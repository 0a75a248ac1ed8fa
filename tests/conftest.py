"""Shared fixtures: a tiny real-text indexed corpus, run-config files, and a launcher for
multi-process runs over gloo (torchrun, as users launch)."""
from __future__ import annotations

import ast
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.forkserver import Client

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CACHED_CORPUS = REPO / ".cache" / "apollo_ds" / "data" / "corpus.txt"


def real_text_lines(max_lines: int = 3000) -> list[str]:
    """Real English: the fetched corpus when present, else the standard library's docstrings
    (always on the machine, no network)."""
    if CACHED_CORPUS.exists():
        with open(CACHED_CORPUS) as f:
            return [ln.strip() for _, ln in zip(range(max_lines), f) if ln.strip()]
    lines = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    lines.append(" ".join(doc.split()))
        if len(lines) >= max_lines:
            break
    return lines[:max_lines]


@dataclass
class Corpus:
    prefix: str
    tokenizer: str
    vocab: int


def run(cmd: list[str], cwd=REPO, env=None, timeout=900) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


# `make test` runs on pytest-xdist workers with --dist loadfile: each file runs whole on one
# worker (its module-scoped reference runs happen once), files handed out in this order as
# workers free up. The longest files go first, so that the workers end together.
LONGEST_FIRST = ("tests/e2e/test_orphans.py", "tests/e2e/test_slurm.py",
                 "tests/distributed/test_recompute_matrix.py", "tests/e2e/test_kill9.py",
                 "tests/e2e/test_launchers.py", "tests/distributed/test_training.py",
                 "tests/e2e/test_gpu_check.py", "tests/e2e/test_signals.py",
                 "tests/distributed/test_reshape.py", "tests/distributed/test_expansion.py",
                 "tests/e2e/test_generate_export.py", "tests/e2e/test_disk.py",
                 "tests/distributed/test_pipeline.py", "tests/e2e/test_nonfinite.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(REPO).as_posix(), len(rank)))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves os.environ as it found it: code under test (Slurm rank discovery)
    writes RANK/WORLD_SIZE/MASTER_* into os.environ directly, which monkeypatch does not undo
    for variables that did not exist before, and every later subprocess would inherit them
    (a leaked RANK=3 makes the next pretrain.py think it is not rank 0)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    d = tmp_path_factory.mktemp("corpus")
    txt = d / "text.txt"
    txt.write_text("\n".join(real_text_lines(2000)) + "\n")
    vocab = 512
    r = run([PY, "data_prep/train_tokenizer.py", "--input", str(txt), "--vocab-size",
             str(vocab), "--model-prefix", str(d / "spm")])
    assert r.returncode == 0, r.stderr
    r = run([PY, "data_prep/preprocess_data.py", "--input", str(txt), "--tokenizer-model",
             str(d / "spm.model"), "--output-prefix", str(d / "text"), "--append-eod",
             "--workers", "1"])
    assert r.returncode == 0, r.stderr
    return Corpus(prefix=str(d / "text"), tokenizer=str(d / "spm.model"), vocab=vocab)


_PORTS_GIVEN: set[int] = set()
_PORT_RNG = random.Random()   # its own: tests that seed the global one must not repeat ports


def free_port() -> int:
    """A port free now that no other test of this run will be handed: below Linux's ephemeral
    range (32768+, where bind(0) and every outgoing connection, gloo's included, get theirs, so
    none can take it before the launcher binds it), from this pytest-xdist worker's own slice
    of 10000-19999 (two workers never pick the same one), never twice in one process."""
    n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    i = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    span = 10000 // max(n, 1)
    for _ in range(500):
        port = 10000 + i * span + _PORT_RNG.randrange(span)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free port in this worker's slice of 10000-19999")


def write_config(path: Path, corpus: Corpus, **sections) -> Path:
    """A tiny run config (0.2 M parameters) over ``corpus``; ``sections`` update it."""
    cfg = {
        "model": {"layers": 4, "hidden": 64, "heads": 4, "seq_len": 32,
                  "vocab_size": corpus.vocab},
        "apollo": {"enabled": False},
        "data": {"prefix": corpus.prefix, "tokenizer": corpus.tokenizer},
        "train": {"steps": 10, "micro_batch": 2, "global_batch": 8, "lr": 3e-3,
                  "warmup": 2, "log_interval": 1, "eval_iters": 2,
                  "deepspeed_config": "ds_configs/zero1_fp32.json"},
    }
    for sec, vals in sections.items():
        cfg.setdefault(sec, {}).update(vals)
    path.write_text(yaml.safe_dump(cfg))
    return path


_FORKSERVER = Client(PY, str(REPO))


def torchrun(nproc: int, script: str, args: list[str], timeout=900,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``nproc`` ranks of ``script`` on this node, started as torchrun starts them, by this
    worker's fork server (tests/forkserver.py: the imports are paid once, not per rank), or by
    torchrun itself when APOLLO_TEST_LAUNCHER=torchrun or the server cannot serve."""
    port = free_port()
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS="1", **(env or {}))
    r = _FORKSERVER.launch(nproc, script, args, full_env, str(REPO), port, timeout)
    if r is None:
        r = run([PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", str(port), script, *args], env=env, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(r.args)} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def pretrain(nproc: int, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    return torchrun(nproc, "apollo_ds/pretrain.py", ["--config", str(config), *overrides])


def pretrain_and_export(tmp: Path, corpus: Corpus) -> tuple[Path, Path]:
    """A tiny real run with one growth (2 -> 4 unique layers at step 3 of 6) and its Hugging
    Face export: (run directory, export directory)."""
    cfg = write_config(tmp / "run.yaml", corpus,
                       apollo={"enabled": True, "stages": [2, 4], "stage_ends": [3]},
                       train={"steps": 6, "out_dir": str(tmp / "run")})
    pretrain(1, cfg)
    from apollo_ds.convert.to_hf import main
    assert main(["--checkpoint", str(tmp / "run"), "--output", str(tmp / "hf")]) == 0
    return tmp / "run", tmp / "hf"


def tokenizer_files(d: Path, lines: list[str]) -> dict:
    """Real tokenizer files built here from ``lines``: a SentencePiece BPE without a pad piece
    (Llama-2's convention), GPT-2 vocab.json + merges.txt (a byte-level BPE of `tokenizers`)
    and a tiktoken encoding file (tiktoken's educational BPE). Returns their paths, the text
    file and the tiktoken ranks."""
    import base64

    import sentencepiece as spm
    import tiktoken._educational as edu
    from tokenizers import ByteLevelBPETokenizer

    from apollo_ds.data.tokenizer import TIKTOKEN_PATTERN
    text = d / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(d / "nopad"), vocab_size=400, model_type="bpe",
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2, byte_fallback=True, minloglevel=2)
    gpt2 = ByteLevelBPETokenizer()
    gpt2.train([str(text)], vocab_size=380, special_tokens=["<|endoftext|>"],
               show_progress=False)
    (d / "gpt2").mkdir()
    gpt2.save_model(str(d / "gpt2"))
    ranks = edu.bpe_train("\n".join(lines[:60]), 300, TIKTOKEN_PATTERN, visualise=None)
    with open(d / "small.tiktoken", "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" %d\n" % rank)
    return {"text": text, "nopad": d / "nopad.model", "gpt2": d / "gpt2",
            "tiktoken": d / "small.tiktoken", "ranks": ranks}


def read_metrics(out_dir) -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def single_process_group():
    """A 1-rank gloo group with megatron-core's parallel state at TP=PP=1, for in-process
    model tests."""
    import torch.distributed as tdist
    from megatron.core import parallel_state
    from apollo_ds import cpu_compat
    cpu_compat.apply()
    if not tdist.is_initialized():
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                 rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield


def assert_weights_close(wa: dict, wb: dict, heads: int, rtol: float = 1e-5,
                         atol: float = 2e-5, outlier_atol: float = 1e-4,
                         max_outliers: float = 1e-3) -> None:
    """Gathered full weights of two layouts agree, except the attention key bias: adding a
    constant to every key score of a query leaves softmax unchanged, so its gradient is zero up
    to float noise, and Adam (which divides by sqrt(v)+eps) turns that layout-dependent noise
    into O(lr) updates; its value is not a function of the run. The same amplification moves
    isolated near-zero-gradient elements apart by a fraction of one step's size (measured after
    12 steps at lr 3e-3: 1.1e-5 and 2.3e-5 on one element in 12,288, depending on the order
    of the reductions). So: every element within rtol/atol, except at most ``max_outliers``
    of a tensor's elements, which must still be within ``outlier_atol`` (lr/30)."""
    import torch
    assert wa.keys() == wb.keys()
    for k in wa:
        a, b = wa[k], wb[k]
        if k.endswith("qkv.bias"):   # rows laid out per head as [heads, 3 (q, k, v), head_dim]
            keep = torch.ones(heads, 3, a.numel() // (3 * heads), dtype=torch.bool)
            keep[:, 1] = False
            a, b = a[keep.flatten()], b[keep.flatten()]
        assert a.shape == b.shape, k
        diff = (b.double() - a.double()).abs()
        off = diff > atol + rtol * a.double().abs()
        assert off.sum().item() <= max(1, int(max_outliers * a.numel())) and (
            diff.max().item() <= outlier_atol), (
            f"{k}: {off.sum().item()} of {a.numel()} elements differ beyond atol {atol}, "
            f"largest {diff.max().item():.3g}")
