"""What a run tells its user, on rank 0: the start-up banner (model size, layout, data, the
Apollo plan), the resolved config with package versions and the code's revision in
``out_dir/config.resolved.yaml`` (written before the first step, so a run that dies early
still leaves its record), the time and elapsed time of every line the trainer prints (and the
ETA of every step line), and
``out_dir/train.log``: everything rank 0 prints to stdout, appended, one block per start."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import time

import yaml

from apollo_ds.config import ConfigError
from apollo_ds.training import metrics

LOG = "train.log"
RESOLVED = "config.resolved.yaml"
PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers")


def versions() -> dict:
    out = {}
    for name in ("apollo_ds",) + PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: str | None = None) -> dict | None:
    """{"rev", "dirty"} of the git checkout holding the code (None outside one, or without
    git)."""
    where = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        st = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"rev": rev.stdout.strip(), "dirty": bool(st.stdout.strip())}


def check_monitors(ds_config: dict, path: str) -> None:
    """DeepSpeed's monitors are optional: wandb enabled needs wandb installed (not a
    dependency)."""
    wb = ds_config.get("wandb")
    if isinstance(wb, dict) and wb.get("enabled") and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"{path} enables the wandb monitor but wandb is not installed; "
                          f"pip install wandb, or set \"wandb\": {{\"enabled\": false}}")


def hms(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class _Tee:
    """sys.stdout that also appends to the run's log file."""

    def __init__(self, stream, path: str):
        self.stream, self.path = stream, path
        self.file = open(path, "a", buffering=1)

    def write(self, s: str) -> int:
        n = self.stream.write(s)
        if self.file is not None:
            self.file.write(s)
        return n

    def flush(self) -> None:
        self.stream.flush()
        if self.file is not None:
            self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def dataset_tokens(ds) -> int | None:
    """Tokens of the documents a (blended) megatron-core GPTDataset draws from: its split of
    each prefix. None when the dataset does not say."""
    if ds is None:
        return None
    try:
        if hasattr(ds, "datasets"):   # BlendedDataset
            parts = [dataset_tokens(d) for d in ds.datasets]
            return None if None in parts else sum(parts)
        return int(ds.dataset.sequence_lengths[ds.indices].sum())
    except (AttributeError, IndexError, TypeError):
        return None


class RunLog:
    """Rank 0's log: the tee into train.log from construction on (to the end of the process,
    or until ``close`` or the next RunLog in this process), the banner and the resolved config
    (``start``), the clock of the step lines (``clock``)."""

    def __init__(self, out_dir: str, rank: int):
        self.out_dir, self.rank, self.tee = out_dir, rank, None
        self.t0, self.step0 = time.perf_counter(), 0
        self.wall = lambda: time.perf_counter() - self.t0   # the Trainer's, from start()
        if rank != 0:
            return
        metrics.clock = self.stamp
        os.makedirs(out_dir, exist_ok=True)
        if isinstance(sys.stdout, _Tee):   # an earlier run in this process: its log ends here
            old = sys.stdout
            sys.stdout = old.stream
            old.file.close()
            old.file = None
        self.tee = _Tee(sys.stdout, os.path.join(out_dir, LOG))
        sys.stdout = self.tee
        print(f"==== start {time.strftime('%Y-%m-%d %H:%M:%S %Z')} pid {os.getpid()}: "
              f"{' '.join(sys.argv)}", flush=True)

    def stamp(self) -> str:
        return f" | {time.strftime('%H:%M:%S')} | elapsed {hms(self.wall())}"

    def close(self) -> None:
        if metrics.clock == self.stamp:
            metrics.clock = None
        if self.tee is None:
            return
        if sys.stdout is self.tee:
            sys.stdout = self.tee.stream
        self.tee.file.close()
        self.tee.file = None
        self.tee = None

    def clock(self, step: int, steps: int, wall: float) -> str:
        """' | HH:MM:SS | elapsed H:MM:SS | ETA H:MM:SS': ETA from this process's mean step
        time since start-up (expansions, evaluations and saves included)."""
        done = step - self.step0
        rate = (time.perf_counter() - self.t0) / done if done > 0 else 0.0
        return (f" | {time.strftime('%H:%M:%S')} | elapsed {hms(wall)} | "
                f"ETA {hms(rate * (steps - step))}")

    def start(self, trainer) -> None:
        """Banner and resolved config (rank 0), right before the first step."""
        self.t0, self.step0 = time.perf_counter(), trainer.step
        self.wall = trainer._wall   # earlier starts included
        if self.rank != 0:
            return
        info = {"versions": versions(), "git": git_revision(), "layout": trainer.layout,
                "world": trainer.dist.world, "argv": sys.argv,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "start_step": trainer.step,
                "config": trainer.cfg.to_dict()}
        path = os.path.join(self.out_dir, RESOLVED)
        with open(path + ".tmp", "w") as f:
            yaml.safe_dump(info, f, sort_keys=False)
        os.replace(path + ".tmp", path)
        for line in banner(trainer, info):
            print(line)
        sys.stdout.flush()


def banner(trainer, info: dict) -> list[str]:
    from apollo_ds.cli import _format_plan, plan_summary
    from apollo_ds.config import ffn_width, kv_heads_of, tied
    from apollo_ds.flops import padded_vocab
    cfg, lay = trainer.cfg, trainer.layout
    m, t = cfg.model, cfg.train
    h, kv = m.hidden, kv_heads_of(m)
    hd = h // m.heads
    if m.arch == "llama":
        layer = h * (m.heads + 2 * kv) * hd + h * h + 3 * h * ffn_width(m) + 2 * h
    else:
        layer = 3 * h * h + 3 * h + h * h + h + 2 * h * ffn_width(m) + ffn_width(m) + h + 4 * h
    vocab = padded_vocab(m.vocab_size, m.pad_vocab_to, lay["tp"]) * h
    # embeddings (+ an untied head), learned positions, the final norm
    emb = vocab * (1 if tied(m) else 2) + (0 if m.arch == "llama" else m.seq_len * h + h) + h
    n = trainer.model.n_unique if trainer.model is not None else cfg.apollo.stages[0]
    v = info["versions"]
    git = info["git"]
    rev = f"{git['rev'][:12]}{' (modified)' if git['dirty'] else ''}" if git else "not a git checkout"
    tokens_step = t.global_batch * m.seq_len
    run_tokens = tokens_step * t.steps
    have = dataset_tokens(trainer.train_ds)
    data = (f"{have:,} tokens in the training data, {run_tokens / have:.2f} epochs"
            if have else "training data size unknown")
    lines = [
        f"apollo_ds {v['apollo_ds'] or '(source)'} | torch {v['torch']} | deepspeed "
        f"{v['deepspeed']} | megatron-core {v['megatron-core']} | transformers "
        f"{v['transformers']} | git {rev}",
        f"model: {m.arch}, {m.layers} layers x hidden {h}, {m.heads} heads"
        f"{f' ({kv} kv)' if kv != m.heads else ''}, seq {m.seq_len}, vocab {m.vocab_size} | "
        f"parameters: {(emb + m.layers * layer) / 1e6:.3f} M at full depth "
        f"({layer / 1e6:.3f} M per unique layer, {emb / 1e6:.3f} M embeddings); "
        f"pool now {n} unique of {m.layers} ({(emb + n * layer) / 1e6:.3f} M)",
        f"layout: dp {lay['dp']} x tp {lay['tp']} x pp {lay['pp']} = {trainer.dist.world} "
        f"ranks | ZeRO {lay['zero']} | {lay['dtype'].replace('torch.', '')} | micro-batch "
        f"{t.micro_batch} x {trainer.grad_accum} accumulation",
        f"data: {tokens_step:,} tokens per step, {run_tokens:,} over {t.steps} steps; {data}",
    ]
    lines += _format_plan(plan_summary(cfg)).splitlines()
    lines.append(f"out_dir {t.out_dir}: {LOG}, {RESOLVED}, metrics.jsonl, tensorboard/"
                 f"{f'; starting at step {trainer.step}' if trainer.step else ''}")
    return lines
