"""Value checks that run before any work: every setting's type and range (the optimizer's and
DeepSpeed's own rules where they exist), the DeepSpeed JSON through DeepSpeed's config models,
a memory estimate that refuses a model that cannot fit the machine before anything is
allocated, and the data's contents (its index tables and the largest token id against the
vocabulary). Each refusal is one ConfigError line naming the setting or file and the fix.
Imports nothing heavy at module level (config.validate calls ``check_values``)."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from apollo_ds.config import ConfigError, RunConfig

GIB = 1 << 30


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _finite(name: str, value: float, lo: float | None = None, lo_open: bool = False,
            hi: float | None = None, hi_open: bool = False, hint: str = "") -> None:
    """``name=value`` must be a finite number in the given range."""
    rng = (f"{'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, "
           f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}")
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    where = f" in {rng}" if lo is not None or hi is not None else ""
    _need(ok, f"{name}={value} must be a finite number{where}{hint}")


# ------------------------------------------------------------------ the config tree
def check_values(cfg: RunConfig) -> None:
    m, a, d, t = cfg.model, cfg.apollo, cfg.data, cfg.train
    # torch.optim.AdamW's own rules: 0 <= beta < 1, lr >= 0, weight_decay >= 0
    for name in ("beta1", "beta2"):
        _finite(f"train.{name}", getattr(t, name), 0, False, 1, True,
                " (torch.optim.AdamW's range; typical 0.9 / 0.95)")
    # ranges validate() already states are only checked for finiteness here
    for name in ("lr", "min_lr", "warmup", "decay"):
        _finite(f"train.{name}", getattr(t, name))
    _finite("train.weight_decay", t.weight_decay, 0, hint=" (>= 0; 0 turns it off)")
    _finite("train.grad_clip", t.grad_clip, 0, hint=" (>= 0; 0 turns clipping off)")
    _need(0 <= t.seed < 2 ** 32, f"train.seed={t.seed} must be an integer in [0, 2**32) "
                                 f"(numpy's and torch's seed range)")
    _need(t.stop_after <= t.steps, f"train.stop_after={t.stop_after} is beyond train.steps="
                                   f"{t.steps}; set it to a step <= {t.steps} (0: off)")
    _need(bool(str(t.out_dir or "").strip()), "train.out_dir is empty; give the run "
                                              "directory, e.g. train.out_dir=runs/my_run")
    _finite("model.dropout", m.dropout)
    _finite("model.init_std", m.init_std, 0, True, hint=" (GPT-2: 0.02)")
    _finite("model.layernorm_eps", m.layernorm_eps, 0, True, hint=" (e.g. 1e-5)")
    _finite("model.rope_theta", m.rope_theta)
    _need(m.pad_vocab_to >= 1, f"model.pad_vocab_to={m.pad_vocab_to} must be >= 1 (1: no "
                               f"padding; 128 is Megatron's default)")
    if a.enabled:
        for e in a.stage_ends:
            _need(not isinstance(e, float) or math.isfinite(e),
                  f"apollo.stage_ends={a.stage_ends}: {e} is not a finite number; give "
                  f"fractions of train.steps (< 1) or step numbers")
    _check_split(d.split)
    prefix = d.prefix
    if isinstance(prefix, (list, tuple)) and len(prefix) > 1:
        _need(len(prefix) % 2 == 0, f"data.prefix={prefix!r}: a blend is a list of weight, "
                                    f"prefix pairs, e.g. [0.7, data/a, 0.3, data/b]")


def _check_split(split) -> None:
    parts = [p.strip() for p in str(split).split(",")]
    nums = []
    for p in parts:
        try:
            nums.append(float(p))
        except ValueError:
            nums = None
            break
    _need(nums is not None and 1 <= len(nums) <= 3 and all(math.isfinite(x) for x in nums),
          f"data.split={split!r}: expected up to three comma-separated non-negative numbers "
          f"(train,valid,test weights), e.g. 98,2,0")
    _need(all(x >= 0 for x in nums), f"data.split={split!r}: weights must be non-negative "
                                      f"numbers, e.g. 98,2,0")


# ------------------------------------------------------------------ DeepSpeed JSON
def check_ds_json(ds, path: str) -> None:
    """The parts of a DeepSpeed config apollo_ds uses, checked with DeepSpeed's own pydantic
    models (unknown or misspelt keys, ranges, types), and the sections it must not have."""
    _need(isinstance(ds, dict), f"DeepSpeed config {path} must be a JSON object "
                                f"({{...}}), not {type(ds).__name__}; see ds_configs/")
    for key in ("zero_optimization", "bf16", "fp16"):
        if key in ds:
            _need(isinstance(ds[key], dict), f"{path}: {key} must be an object such as "
                                             f"{{\"stage\": 1}} / {{\"enabled\": true}}, not "
                                             f"{json.dumps(ds[key])}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    _need(stage in (0, 1, 2, 3) and not isinstance(stage, bool),
          f"{path}: zero_optimization.stage={stage!r} must be 0, 1, 2 or 3")
    _need("optimizer" not in ds, f"{path}: an \"optimizer\" section is not used: apollo_ds "
                                 f"builds AdamW from train.lr, train.beta1/beta2, "
                                 f"train.weight_decay (train.optimizer); remove the section")
    _need("scheduler" not in ds, f"{path}: a \"scheduler\" section is not used: the lr "
                                 f"schedule is train.lr_schedule with train.warmup / "
                                 f"train.min_lr; remove the section")
    from pydantic import ValidationError
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config)):
        if key in ds:
            try:
                model(**ds[key])
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(x) for x in (key, *err.get("loc", ())))
                raise ConfigError(f"{path}: {where}: {err.get('msg', 'invalid')} (DeepSpeed's "
                                  f"own rule); fix or remove the key") from None


# ------------------------------------------------------------------ memory
def param_count(cfg: RunConfig) -> int:
    """Parameters of the full-depth model (the pool at its last stage), biases left out."""
    m = cfg.model
    h = m.hidden
    if m.arch == "llama":
        from apollo_ds.config import ffn_width, kv_heads_of
        attn = 2 * h * h + 2 * h * (h // m.heads) * kv_heads_of(m)
        layer = attn + 3 * h * ffn_width(m)
        emb = m.vocab_size * h * (1 if m.tie_embeddings is not False else 2)
        if m.tie_embeddings is None:   # llama's default is untied
            emb = 2 * m.vocab_size * h
    else:
        layer = 4 * h * h + 2 * h * m.ffn_mult * h
        emb = m.vocab_size * h + m.seq_len * h
    return m.layers * layer + emb


def memory_estimate(cfg: RunConfig, world: int, zero: int, bf16: bool) -> tuple[float, str]:
    """A lower bound of one rank's bytes: its share of weights, gradients, fp32 masters and
    Adam moments, plus one micro-batch's logits (fp32, with their gradient). Real use is
    higher (activations, buffers), so a refusal is certain to be right."""
    p = cfg.parallel
    dp = max(1, world // (p.tp * p.pp))
    n = param_count(cfg) / (p.tp * p.pp)
    w = 2 if bf16 else 4                               # weights and gradients
    states = 8 + (4 if bf16 else 0)                    # Adam moments (+ fp32 master in bf16)
    shard = {0: (w + w + states, 0), 1: (w + w, states), 2: (w, w + states),
             3: (0, w + w + states)}[zero]             # (bytes kept whole, bytes / dp)
    per = n * (shard[0] + shard[1] / dp)
    logits = 2 * 4 * cfg.train.micro_batch * cfg.model.seq_len * cfg.model.vocab_size / p.tp
    why = (f"{n * (p.tp * p.pp) / 1e9:.3g} B parameters, {logits / GIB:.3g} GiB of logits per "
           f"micro-batch")
    return per + logits, why


def check_memory(cfg: RunConfig, world: int | None, zero: int, bf16: bool,
                 env=os.environ) -> None:
    world = world or 1
    need, why = memory_estimate(cfg, world, zero, bf16)
    acc = env.get("DS_ACCELERATOR")
    where, have = "host memory", None
    if acc != "cpu":
        try:
            import torch
            if torch.cuda.is_available():
                where = f"GPU memory ({torch.cuda.get_device_name(0)})"
                have = torch.cuda.get_device_properties(0).total_memory
        except Exception:   # no usable CUDA: judge against the host
            have = None
    if have is None:
        import psutil
        local = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE", "1")
                    .split("(")[0] or 1)
        have = psutil.virtual_memory().total / max(1, min(local, world))
    if need > have:
        m, t = cfg.model, cfg.train
        raise ConfigError(
            f"the run needs at least {need / GIB:,.1f} GiB per rank ({why}) but a rank has "
            f"{have / GIB:,.1f} GiB of {where} (model.layers={m.layers}, model.hidden="
            f"{m.hidden}, model.vocab_size={m.vocab_size}, model.seq_len={m.seq_len}, "
            f"train.micro_batch={t.micro_batch}); shrink the model or micro-batch, or spread "
            f"it with parallel.tp / parallel.pp / a higher ZeRO stage")


# ------------------------------------------------------------------ data contents
def check_data_contents(prefix: str, vocab_size: int, cache_dir: str | None = None) -> None:
    """The index tables of PREFIX.idx agree with each other (every sequence's pointer is the
    previous one's end), and no token id in PREFIX.bin reaches ``vocab_size``: the largest id
    comes from PREFIX.meta.json (``max_token_id``, written by preprocessing) or one scan of the
    file, remembered in ``cache_dir`` by the data's size and modification time."""
    from apollo_ds.data.indexed import DTYPES, HEADER_BYTES
    idx, binf = prefix + ".idx", prefix + ".bin"
    with open(idx, "rb") as f:
        head = f.read(HEADER_BYTES)
    name, itemsize = DTYPES[head[17]]
    n_seq = int.from_bytes(head[18:26], "little")
    lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=HEADER_BYTES, shape=(n_seq,))
    pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=HEADER_BYTES + 4 * n_seq,
                         shape=(n_seq,))
    ends = pointers.astype(np.int64) + lengths.astype(np.int64) * itemsize
    bad = np.flatnonzero((lengths < 0) | np.append(ends[:-1] != pointers[1:], False))
    if bad.size:
        i = int(bad[0])
        raise ConfigError(f"indexed dataset index {idx} is corrupt: sequence {i} has length "
                          f"{int(lengths[i])} at byte {int(pointers[i])}, which does not meet "
                          f"the next sequence; rerun apollo-ds preprocess to rebuild it")
    top, remember = _max_token_id(prefix, name, cache_dir)
    if top >= vocab_size:
        raise ConfigError(f"indexed dataset {binf} holds token id {top} but model.vocab_size="
                          f"{vocab_size}: the data was tokenized with a larger vocabulary; set "
                          f"model.vocab_size>{top} or rerun apollo-ds preprocess with this "
                          f"run's tokenizer")
    remember()   # only data that passed is remembered: a refusal writes nothing


def _max_token_id(prefix: str, dtype: str, cache_dir: str | None):
    """(largest token id, a function that records a scanned value for the next start)."""
    binf = prefix + ".bin"
    nothing = lambda: None   # noqa: E731
    try:
        with open(prefix + ".meta.json") as f:
            meta = json.load(f)
        if isinstance(meta.get("max_token_id"), int):
            return meta["max_token_id"], nothing
    except (OSError, ValueError):
        pass
    st = os.stat(binf)
    key = f"{os.path.abspath(binf)}:{st.st_size}:{st.st_mtime_ns}"
    memo = os.path.join(cache_dir, "max_token_ids.json") if cache_dir else None
    seen = {}
    if memo and os.path.isfile(memo):
        try:
            with open(memo) as f:
                seen = json.load(f)
        except (OSError, ValueError):
            seen = {}
        if isinstance(seen.get(key), int):
            return seen[key], nothing
    data = np.memmap(binf, dtype=np.dtype(dtype), mode="r")
    top = 0
    for i in range(0, len(data), 1 << 26):   # 64 M tokens a chunk: bounded memory
        top = max(top, int(data[i:i + (1 << 26)].max()))

    def remember() -> None:
        if not memo:
            return
        try:
            os.makedirs(cache_dir, exist_ok=True)
            seen[key] = top
            tmp = memo + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(seen, f)
            os.replace(tmp, memo)
        except OSError:
            pass   # a read-only cache only costs the scan next time
    return top, remember


# ------------------------------------------------------------------ launch
def check_launch_shape(cfg: RunConfig, world: int | None) -> None:
    """parallel.tp/pp > 1 in a lone process (no launcher set WORLD_SIZE)."""
    p = cfg.parallel
    if world is None and p.tp * p.pp > 1:
        n = p.tp * p.pp
        raise ConfigError(f"parallel.tp={p.tp} x parallel.pp={p.pp} needs {n} processes but "
                          f"this is 1 process started without a launcher; run it with "
                          f"torchrun --nproc_per_node {n} (or deepspeed --num_gpus {n}, srun, "
                          f"mpirun -np {n})")


# ------------------------------------------------------------------ disk
# Bytes a checkpoint holds per parameter: DeepSpeed's engine files (the weights in the model's
# dtype, the fp32 master and two Adam moments) plus the layout-free copy (fp32 master and two
# moments); measured 3.88 MB for the 133 k-parameter test model at ZeRO 1 fp32 (29 B each).
def checkpoint_bytes(cfg: RunConfig, bf16: bool, layers: int | None = None) -> int:
    """A checkpoint's size on disk for a pool of ``layers`` unique layers (default: the full
    model), with a 10% margin for the small files and the biases the count leaves out."""
    if layers is not None and layers != cfg.model.layers:
        import dataclasses
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, layers=layers))
    per_param = 12   # fp32 master + two Adam moments, whatever the training precision
    return int(1.1 * param_count(cfg) * per_param)


def free_bytes(path: str) -> int:
    """Free bytes for an unprivileged writer on the file system that holds ``path`` (or the
    nearest existing parent: out_dir may not exist yet)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_disk(cfg: RunConfig, bf16: bool) -> None:
    """Refuse a run whose out_dir cannot hold one full-size checkpoint."""
    need, have = checkpoint_bytes(cfg, bf16), free_bytes(cfg.train.out_dir)
    if have < need:
        raise ConfigError(f"train.out_dir={cfg.train.out_dir} has {have / 2**20:,.1f} MiB free "
                          f"but one checkpoint of this model needs about {need / 2**20:,.1f} "
                          f"MiB; free space there or choose another train.out_dir")
