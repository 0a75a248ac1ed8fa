"""The bad-input suite: a table of bad configs, data, checkpoints and launch environments. Each
is refused by apollo_ds/pretrain.py with exit code 2 and ONE line naming the file or setting
and the fix, before any work starts (the table runs main() in-process with
distributed.init replaced by a failure, so an input that gets past the checks fails the case
instead of starting a run), and nothing already on disk changes (every file under the case's
directory and the shared corpus is hashed before and after). A few rows also run as real
processes (exit code and stderr end to end)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import PY, REPO, run
from tests.e2e.helpers import tiny_config, torchrun_cmd


# ------------------------------------------------------------------ shared inputs
@pytest.fixture(scope="module")
def inputs(corpus, tmp_path_factory):
    """The corpus (tokenizer A), a second tokenizer B and the corpus tokenized with it, and a
    real 2-process ZeRO-1 checkpoint (2 steps) of the tiny config."""
    d = tmp_path_factory.mktemp("bad_inputs")
    text = Path(corpus.prefix).parent / "text.txt"
    r = run([PY, "data_prep/train_tokenizer.py", "--input", str(text), "--vocab-size", "400",
             "--model-prefix", str(d / "spmB"), "--threads", "1"])
    assert r.returncode == 0, r.stderr
    r = run([PY, "data_prep/preprocess_data.py", "--input", str(text), "--tokenizer-model",
             str(d / "spmB.model"), "--output-prefix", str(d / "textB"), "--append-eod",
             "--workers", "1"])
    assert r.returncode == 0, r.stderr
    cfg = tiny_config(d / "run.yaml", corpus, steps=2)
    out = d / "run"
    r = run(torchrun_cmd(cfg, out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert (out / "checkpoints" / "step_0000002" / "manifest.json").is_file()
    return {"corpus": corpus, "dir": d, "run": out, "config": cfg}


class Case:
    """A row's own directory: a copy of the tiny config, data, tokenizer and run to damage."""

    def __init__(self, inputs, path: Path):
        self.inputs, self.path = inputs, path
        self.cfg = yaml.safe_load(Path(inputs["config"]).read_text())
        self.out = path / "run"
        self.cfg["train"]["out_dir"] = str(self.out)
        self.args: list[str] = []
        self.env: dict = {}

    def data(self) -> str:
        """A private copy of the corpus files; returns the prefix."""
        src = Path(self.inputs["corpus"].prefix)
        for ext in (".bin", ".idx", ".meta.json"):
            if (src.parent / (src.name + ext)).exists():
                shutil.copy(src.parent / (src.name + ext), self.path / ("data" + ext))
        self.cfg["data"]["prefix"] = str(self.path / "data")
        return str(self.path / "data")

    def tokenizer(self) -> Path:
        shutil.copy(self.inputs["corpus"].tokenizer, self.path / "tok.model")
        self.cfg["data"]["tokenizer"] = str(self.path / "tok.model")
        return self.path / "tok.model"

    def checkpoint(self) -> Path:
        """A copy of the real 2-process run (resumed under WORLD_SIZE=2)."""
        shutil.copytree(self.inputs["run"], self.out)
        self.env.update(WORLD_SIZE="2", RANK="0")
        return self.out / "checkpoints" / "step_0000002"

    def ds(self, text: str) -> None:
        (self.path / "ds.json").write_text(text)
        self.cfg["train"]["deepspeed_config"] = str(self.path / "ds.json")

    def config_path(self) -> Path:
        p = self.path / "run.yaml"
        p.write_text(yaml.safe_dump(self.cfg))
        return p


def _big_ids(c) -> None:
    """One token of the copied data (no meta file: as data from elsewhere) set to an id the
    512-token model cannot embed."""
    import numpy as np
    b = Path(c.path / "data.bin")
    arr = np.fromfile(b, dtype=np.uint16)
    arr[len(arr) // 2] = 60000
    arr.tofile(b)


def _corrupt_idx_length(path) -> None:
    """Sequence 3's length in the .idx table (int32s after the 34-byte header) made far larger
    than the data between its pointer and the next: the header and the last entries still
    agree, so only a full table check finds it (before: a crash at step 1)."""
    import struct
    data = bytearray(Path(path).read_bytes())
    struct.pack_into("<i", data, 34 + 4 * 3, 10 ** 6)
    Path(path).write_bytes(bytes(data))


def _truncate(path, keep: int) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:keep])


# Each row: (id, prepare(case) -> None, substrings the one error line must contain). Every
# expected line names the file or setting and says what to do.
def _r(c, *a):
    c.args += list(a)


ROWS = [
    # ---- config
    ("config file missing", lambda c: setattr(c, "config_override", c.path / "nope.yaml"),
     ["config file not found:", "nope.yaml", "presets live in configs/"]),
    ("config not yaml", lambda c: setattr(c, "config_text", "model: [1, 2\n"),
     ["is not valid YAML"]),
    ("unknown key", lambda c: _r(c, "train.stepz=3"),
     ["unknown config key 'train.stepz'", "known keys of 'train'"]),
    ("bad override", lambda c: _r(c, "train.steps"), ["bad override 'train.steps'",
                                                      "write section.key=value"]),
    ("heads do not divide hidden", lambda c: _r(c, "model.heads=3"),
     ["model.heads=3 does not divide model.hidden=64", "pick heads"]),
    ("unknown nonfinite policy", lambda c: _r(c, "train.on_nonfinite=ignore"),
     ["train.on_nonfinite='ignore' is unknown", "choose one of stop, skip"]),
    ("deepspeed config missing", lambda c: _r(c, f"train.deepspeed_config={c.path}/no.json"),
     ["DeepSpeed config not found:", "no.json", "ds_configs/"]),
    ("deepspeed config not json", lambda c: c.ds('{"zero_optimization": {"stage": 1},'),
     ["ds.json is not valid JSON"]),
    ("zero stage 4", lambda c: c.ds('{"zero_optimization": {"stage": 4}}'),
     ["ds.json: zero_optimization.stage=4 must be 0, 1, 2 or 3"]),
    ("fp16", lambda c: c.ds('{"zero_optimization": {"stage": 1}, "fp16": {"enabled": true}}'),
     ["ds.json: fp16 is not supported; use bf16"]),
    ("bf16 at zero 0", lambda c: c.ds('{"zero_optimization": {"stage": 0}, '
                                      '"bf16": {"enabled": true}}'),
     ["ds.json: bf16 needs ZeRO stage >= 1", "use ds_configs/zero1_bf16.json"]),
    ("zero 2 with pipeline", lambda c: (_r(c, "parallel.pp=2", "train.deepspeed_config="
                                           "ds_configs/zero2_fp32.json"),
                                        c.env.update(WORLD_SIZE="2", RANK="0")),
     ["zero2_fp32.json: ZeRO stage 2 cannot be combined with pipeline parallelism",
      "use ZeRO 0 or 1"]),
    # ---- data
    ("data prefix missing", lambda c: _r(c, f"data.prefix={c.path}/nodata"),
     ["indexed dataset file not found:", "nodata.idx", "apollo-ds preprocess"]),
    ("truncated bin", lambda c: _truncate(c.data() + ".bin", 1000),
     ["data.bin is 1000 bytes but", "data.idx implies", "rerun apollo-ds preprocess"]),
    ("truncated idx", lambda c: _truncate(c.data() + ".idx", 100),
     ["data.idx is corrupt or truncated", "rerun apollo-ds preprocess"]),
    ("idx from another tokenizer", lambda c: shutil.copy(
        c.inputs["dir"] / "textB.idx", c.data() + ".idx"),
     ["data.bin is", "the pair is truncated or from different runs", "rerun"]),
    ("data of another tokenizer", lambda c: _r(c, f"data.prefix={c.inputs['dir']}/textB"),
     ["textB was tokenized with", "spmB.model", "a different model than data.tokenizer",
      "rerun apollo-ds preprocess"]),
    ("tokenizer larger than vocab", lambda c: _r(c, "model.vocab_size=100"),
     ["has 512 tokens but model.vocab_size=100", "set model.vocab_size>=512"]),
    ("tokenizer missing", lambda c: _r(c, f"data.tokenizer={c.path}/none.model"),
     ["tokenizer model not found:", "none.model"]),
    ("tokenizer corrupt", lambda c: c.tokenizer().write_bytes(b"\x00garbage" * 100),
     ["tok.model is not a valid SentencePiece model"]),
    ("split without train data", lambda c: _r(c, "data.split=0,100,0"),
     ["data.split='0,100,0' gives no training data", "e.g. 98,2,0"]),
    ("negative blend weight", lambda c: _r(c, f"data.prefix=[-1,{c.data()}]"),
     ["blend weights must be > 0"]),
    # ---- output directory
    ("out_dir under a file", lambda c: ((c.path / "afile").write_text("x"),
                                        _r(c, f"train.out_dir={c.path}/afile/run")),
     ["train.out_dir=", "afile/run cannot be created", "is a file, not a directory",
      "choose another train.out_dir"]),
    ("out_dir not writable", lambda c: _r(c, "train.out_dir=/proc/apollo_ds_bad_input"),
     ["train.out_dir=/proc/apollo_ds_bad_input is not writable", "choose a writable"]),
    # ---- checkpoints
    ("checkpoint of another model", lambda c: (c.checkpoint(), _r(c, "model.hidden=32")),
     ["cannot resume from", "step_0000002: model.hidden was 64, this run has 32",
      "use a new train.out_dir"]),
    ("checkpoint with another seed", lambda c: (c.checkpoint(), _r(c, "train.seed=7")),
     ["train.seed was 1234, this run has 7", "restore the checkpoint's setting"]),
    ("missing rank shard", lambda c: (
        c.checkpoint() / "params" / "rank_00001.bin").unlink(),
     ["no valid checkpoint in", "params/rank_00001.bin is missing",
      "move", "away to start fresh"]),
    ("truncated shard", lambda c: _truncate(
        c.checkpoint() / "params" / "rank_00000.bin", 64),
     ["params/rank_00000.bin has 64 bytes, the manifest says", "restore the file"]),
    ("corrupt manifest", lambda c: (c.checkpoint() / "manifest.json").write_text("{not json"),
     ["no valid checkpoint in", "manifest.json unreadable", "start fresh"]),
    ("corrupt run state", lambda c: (c.checkpoint() / "run_state.json").write_text("{"),
     ["no valid checkpoint in", "latest names step_0000002", "run_state.json unreadable"]),
    ("checkpoint of another tokenizer", lambda c: (
        c.checkpoint(), _r(c, f"data.prefix={c.inputs['dir']}/textB",
                           f"data.tokenizer={c.inputs['dir']}/spmB.model")),
     ["cannot resume from", "data.tokenizer was", "spm.model", "spmB.model",
      "restore the checkpoint's setting to resume, or use a new train.out_dir"]),
    # ---- launch environment
    ("world not divisible by tp x pp", lambda c: (_r(c, "parallel.tp=2"),
                                                  c.env.update(WORLD_SIZE="3", RANK="0")),
     ["world size 3 is not a multiple of parallel.tp*parallel.pp=2",
      "launch tp*pp*dp processes"]),
    ("batch not divisible by dp", lambda c: c.env.update(WORLD_SIZE="3", RANK="0"),
     ["train.global_batch=8 is not divisible by train.micro_batch=2 x data-parallel size 3",
      "make it a multiple of 6"]),
    ("cuda requested without cuda", lambda c: c.env.update(DS_ACCELERATOR="cuda"),
     ["DS_ACCELERATOR=cuda but torch", "finds no CUDA device", "or set DS_ACCELERATOR=cpu"]),
    ("unknown accelerator", lambda c: c.env.update(DS_ACCELERATOR="xpu"),
     ["DS_ACCELERATOR=xpu is not supported; use cuda or cpu"]),
    ("more slurm tasks than gpus", lambda c: c.env.update(
        DS_ACCELERATOR=None, SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="4",
        SLURM_GPUS_ON_NODE="2"),
     ["Slurm starts 4 tasks on a node with 2 GPUs", "--ntasks-per-node=2"]),
    ("master port in use", lambda c: c.env.update(
        RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(c.busy_port)),
     ["is already in use on 127.0.0.1", "pick a free port"]),
]

# Rows added with issue 21 (each failed before: a traceback, an allocation until memory ran out,
# a crash at step 1, or silent acceptance).
ROWS += [
    # ---- optimizer and schedule values (torch.optim.AdamW's and DeepSpeed's own ranges)
    ("beta1 above 1", lambda c: _r(c, "train.beta1=1.5"), ["train.beta1=1.5", "[0, 1)"]),
    ("beta2 negative", lambda c: _r(c, "train.beta2=-0.1"), ["train.beta2=-0.1", "[0, 1)"]),
    ("beta1 equal 1", lambda c: _r(c, "train.beta1=1.0"), ["train.beta1=1.0", "[0, 1)"]),
    ("lr nan", lambda c: _r(c, "train.lr=nan"), ["train.lr=nan", "finite"]),
    ("lr infinite", lambda c: _r(c, "train.lr=inf"), ["train.lr=inf", "finite"]),
    ("warmup infinite", lambda c: _r(c, "train.warmup=inf"), ["train.warmup=inf", "finite"]),
    ("min_lr infinite", lambda c: _r(c, "train.min_lr=inf"), ["train.min_lr", "inf"]),
    ("negative weight decay", lambda c: _r(c, "train.weight_decay=-0.1"),
     ["train.weight_decay=-0.1", ">= 0"]),
    ("weight decay nan", lambda c: _r(c, "train.weight_decay=nan"),
     ["train.weight_decay=nan"]),
    ("negative grad clip", lambda c: _r(c, "train.grad_clip=-1"),
     ["train.grad_clip=-1", ">= 0"]),
    ("beta1 nan", lambda c: _r(c, "train.beta1=nan"), ["train.beta1=nan", "[0, 1)"]),
    ("grad clip infinite", lambda c: _r(c, "train.grad_clip=inf"),
     ["train.grad_clip=inf", "finite"]),
    ("stage end infinite", lambda c: _r(c, "apollo.enabled=true", "apollo.stages=[1,2]",
                                        "apollo.stage_ends=[.inf]"),
     ["apollo.stage_ends", "inf is not a finite number"]),
    ("out_dir empty", lambda c: _r(c, "train.out_dir="), ["train.out_dir", "empty"]),
    ("negative seed", lambda c: _r(c, "train.seed=-1"), ["train.seed=-1", "[0, 2**32)"]),
    ("seed too large", lambda c: _r(c, "train.seed=5000000000"),
     ["train.seed=5000000000", "[0, 2**32)"]),
    ("steps not an integer", lambda c: _r(c, "train.steps=ten"),
     ["train.steps", "ten", "integer"]),
    ("lr not a number", lambda c: _r(c, "train.lr=fast"), ["train.lr", "fast", "number"]),
    ("decay infinite", lambda c: _r(c, "train.decay=inf", "train.lr_schedule=wsd"),
     ["train.decay=inf", "finite"]),
    ("dist timeout zero", lambda c: _r(c, "train.dist_timeout_minutes=0"),
     ["train.dist_timeout_minutes=0", "positive"]),
    # ---- model values
    ("dropout nan", lambda c: _r(c, "model.dropout=nan"), ["model.dropout=nan", "finite"]),
    ("init std zero", lambda c: _r(c, "model.init_std=0"), ["model.init_std=0", "(0, inf)"]),
    ("init std infinite", lambda c: _r(c, "model.init_std=inf"),
     ["model.init_std=inf", "finite"]),
    ("layernorm eps negative", lambda c: _r(c, "model.layernorm_eps=-1e-5"),
     ["model.layernorm_eps=-1e-05", "(0, inf)"]),
    ("rope theta nan", lambda c: _r(c, "model.rope_theta=nan"), ["model.rope_theta=nan"]),
    ("negative vocab padding", lambda c: _r(c, "model.pad_vocab_to=-128"),
     ["model.pad_vocab_to=-128", ">= 1"]),
    ("vocabulary of 10^9", lambda c: _r(c, "model.vocab_size=1000000000"),
     ["model.vocab_size=1000000000", "GiB", "memory"]),
    ("a million layers", lambda c: _r(c, "model.layers=1000000",
                                      "apollo.enabled=false"),
     ["model.layers=1000000", "GiB", "memory"]),
    ("hidden of 10^6", lambda c: _r(c, "model.hidden=1000000", "model.heads=1"),
     ["model.hidden=1000000", "GiB", "memory"]),
    ("seq_len of 10^8", lambda c: _r(c, "model.seq_len=100000000"),
     ["model.seq_len=100000000", "GiB", "memory"]),
    ("micro batch of 10^7", lambda c: _r(c, "train.micro_batch=10000000",
                                         "train.global_batch=10000000"),
     ["train.micro_batch=10000000", "GiB", "memory"]),
    # ---- data values
    ("negative split", lambda c: _r(c, "data.split=-1,50,51"),
     ["data.split='-1,50,51'", "non-negative"]),
    ("split not numbers", lambda c: _r(c, "data.split=a,b,c"),
     ["data.split='a,b,c'", "numbers"]),
    ("reduce bucket of zero", lambda c: c.ds('{"zero_optimization": {"stage": 2, '
                                             '"reduce_bucket_size": 0}}'),
     ["ds.json", "zero_optimization.reduce_bucket_size", "DeepSpeed's own rule"]),
    ("blend with odd entries", lambda c: _r(c, f"data.prefix=[1,{c.data()},2]"),
     ["data.prefix", "weight, prefix pairs"]),
    ("token ids beyond the vocabulary", lambda c: (
        c.data(), (c.path / "data.meta.json").unlink(missing_ok=True), _big_ids(c)),
     ["data.bin", "token id 60000", "model.vocab_size=512"]),
    ("idx sequence length corrupted", lambda c: _corrupt_idx_length(c.data() + ".idx"),
     ["data.idx is corrupt: sequence 3 has length", "rerun apollo-ds preprocess"]),
    # ---- DeepSpeed JSON (DeepSpeed's own config models where they exist)
    ("deepspeed config not an object", lambda c: c.ds("[1, 2]"),
     ["ds.json", "must be a JSON object"]),
    ("zero section not an object", lambda c: c.ds('{"zero_optimization": 2}'),
     ["ds.json", "zero_optimization", "object"]),
    ("zero key misspelt", lambda c: c.ds('{"zero_optimization": {"stage": 1, '
                                         '"overlap_comms": true}}'),
     ["ds.json", "overlap_comms"]),
    ("bf16 section not an object", lambda c: c.ds('{"bf16": true}'),
     ["ds.json", "bf16", "object"]),
    ("optimizer section in deepspeed config", lambda c: c.ds(
        '{"zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam", '
        '"params": {"lr": 0.1}}}'),
     ["ds.json", "optimizer", "train.lr"]),
    ("scheduler section in deepspeed config", lambda c: c.ds(
        '{"zero_optimization": {"stage": 1}, "scheduler": {"type": "WarmupLR"}}'),
     ["ds.json", "scheduler", "train.lr_schedule"]),
    ("zero stage a string", lambda c: c.ds('{"zero_optimization": {"stage": "two"}}'),
     ["ds.json", "zero_optimization.stage", "0, 1, 2 or 3"]),
    # ---- launch and resume
    ("tp without a launcher", lambda c: _r(c, "parallel.tp=2"),
     ["parallel.tp=2", "1 process", "torchrun --nproc_per_node 2"]),
    ("fewer steps than the checkpoint", lambda c: (c.checkpoint(), _r(c, "train.steps=1")),
     ["train.steps=1", "step 2", "raise train.steps"]),
    ("stop_after beyond steps", lambda c: _r(c, "train.stop_after=9"),
     ["train.stop_after=9", "train.steps=2"]),
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
               "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
               "TORCHELASTIC_RUN_ID", "DS_ACCELERATOR")


def _snapshot(*roots) -> dict:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_signal_handlers():
    """pretrain.main installs its SIGTERM/SIGUSR1 handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def _argv(c: Case) -> list[str]:
    path = getattr(c, "config_override", None)
    if path is None:
        path = c.config_path()
        if getattr(c, "config_text", None):
            path.write_text(c.config_text)
    return ["--config", str(path), *c.args]


@pytest.mark.parametrize("name,prepare,must", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_refused_before_any_work(name, prepare, must, inputs, tmp_path, monkeypatch,
                                           capsys, no_signal_handlers):
    from apollo_ds import distributed, pretrain
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)   # a port another process listens on
    try:
        c = Case(inputs, tmp_path)
        c.busy_port = busy.getsockname()[1]
        prepare(c)
        argv = _argv(c)
        for var in LAUNCH_VARS:
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        for k, v in c.env.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, v)

        def no_work(*a, **k):
            raise AssertionError(f"{name}: not refused before the process groups")
        monkeypatch.setattr(distributed, "init", no_work)
        before = _snapshot(tmp_path, Path(inputs["corpus"].prefix).parent, inputs["dir"])
        capsys.readouterr()
        rc = pretrain.main(argv)
        err = capsys.readouterr().err
    finally:
        busy.close()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for part in must:
        assert part in lines[0], f"{name}: {part!r} not in {lines[0]!r}"
    assert _snapshot(tmp_path, Path(inputs["corpus"].prefix).parent, inputs["dir"]) == before


def test_table_spans_every_kind_of_input():
    assert len(ROWS) >= 77   # 37 before issue 21, 40 since
    assert len({r[0] for r in ROWS}) == len(ROWS)


# a few rows as real processes: the exit code and stderr end to end
REAL = ["truncated bin", "missing rank shard", "cuda requested without cuda",
        "world not divisible by tp x pp"]


@pytest.mark.parametrize("name", REAL)
def test_real_process_exits_2_with_one_line(name, inputs, tmp_path):
    row = next(r for r in ROWS if r[0] == name)
    c = Case(inputs, tmp_path)
    c.busy_port = None
    row[1](c)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.update({k: v for k, v in c.env.items() if v is not None})
    argv = _argv(c)
    before = _snapshot(tmp_path)
    r = subprocess.run([PY, "apollo_ds/pretrain.py", *argv], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert all(part in lines[0] for part in row[2]), lines[0]
    assert _snapshot(tmp_path) == before
