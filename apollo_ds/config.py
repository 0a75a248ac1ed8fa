"""One configuration tree for a run: model / apollo / parallel / data / train.

Loaded from a YAML preset (configs/*.yaml), then dotted command-line overrides such as
``model.layers=6 apollo.stages=[1,3,6]`` are applied, then ``validate`` runs once. Every
refusal is a ``ConfigError`` whose message names the setting and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

SAMPLERS = ("lvps", "uniform", "sigmoid", "constant_high", "constant_low")
GROW_METHODS = ("interpolate", "stack")
OPTIMIZER_STATE_MODES = ("copy", "copy_scaled", "reset", "release")
UPDATE_SCALES = ("none", "inv_uses")
LR_SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "torch_adam")
RECOMPUTE = ("none", "selective", "full")
ON_NONFINITE = ("stop", "skip")
ALLOW_CHANGES = ("data", "tokenizer", "global_batch", "seed")


class ConfigError(ValueError):
    """A bad setting, refused before any work starts."""


@dataclass
class ModelConfig:
    layers: int = 4                 # final (full) depth L
    hidden: int = 128               # model width h
    heads: int = 4                  # attention heads
    seq_len: int = 128              # tokens per sample (and the largest position)
    vocab_size: int = 2048          # tokenizer vocabulary; padded internally for TP
    ffn_mult: int = 4               # gpt2 MLP width = ffn_mult * hidden
    dropout: float = 0.0            # dropout on embeddings, attention and residual branches
    init_std: float = 0.02          # normal init std (output projections: std/sqrt(2L))
    layernorm_eps: float = 1e-5     # LayerNorm / RMSNorm epsilon
    pad_vocab_to: int = 128         # pad to a multiple of pad_vocab_to * tp
    # gpt2: LayerNorm, GELU MLP of ffn_mult*h, learned positions, biases, tied head.
    # llama: RMSNorm, SwiGLU MLP of ffn_hidden, rotary positions, no biases, kv_heads.
    arch: str = "gpt2"
    kv_heads: int = 0               # llama grouped-query attention; 0: = heads
    ffn_hidden: int = 0             # llama MLP width; 0: 8/3 h rounded up to a multiple of 64
    rope_theta: float = 10000.0     # llama rotary base
    tie_embeddings: Any = None      # None: true for gpt2, false for llama


ARCHS = ("gpt2", "llama")


def model_config_of(recorded: dict) -> "ModelConfig":
    """The ModelConfig a checkpoint's run_state recorded (keys of other versions ignored)."""
    return ModelConfig(**{k: v for k, v in recorded.items()
                          if k in ModelConfig.__dataclass_fields__})


def kv_heads_of(m: "ModelConfig") -> int:
    return m.kv_heads or m.heads


def ffn_width(m: "ModelConfig") -> int:
    """MLP width: ffn_mult*h for gpt2; ffn_hidden or 8/3 h rounded up to a multiple of 64 for
    llama (64, not 64 x TP: so the model is the same under every TP up to 64)."""
    if m.arch != "llama":
        return m.ffn_mult * m.hidden
    return m.ffn_hidden or -(-(8 * m.hidden) // (3 * 64)) * 64


def tied(m: "ModelConfig") -> bool:
    return (m.arch == "gpt2") if m.tie_embeddings is None else bool(m.tie_embeddings)


@dataclass
class ApolloConfig:
    enabled: bool = False           # false: plain full-depth training (stages = [model.layers])
    stages: list = field(default_factory=list)       # unique-layer counts, last == model.layers
    stage_ends: list = field(default_factory=list)   # fractions of train.steps, or step numbers
    sampler: str = "lvps"           # depth distribution within a stage (LVPS: the paper's)
    grow: str = "interpolate"       # layer map: interpolate (i -> floor(i*N/d)) or stack
    # Adam state of the grown pool (apollo/expand.py): copy (each new layer takes its source's
    # moments and step count), copy_scaled (the same, moments divided by k and k^2 for the k
    # uses a source layer's gradient summed, relative to a copy's), reset (every copy but the
    # first of an old layer starts a fresh Adam: zero moments, own step count from 0), release
    # (the authors' release: new layer i < n_old keeps old layer i's own, now stale, moments;
    # layers i >= n_old start fresh)
    optimizer_state: str = "copy"
    # > 0: add growth_noise * std(source tensor) * N(0,1) to every copy but the first of an
    # old layer at each expansion (symmetry breaking; seeded by seed, name and stage, the same
    # at any TP size); 0: exact copies (the expansion identity holds)
    growth_noise: float = 0.0
    # lr multiplier of the pool layers' parameters: none, or inv_uses (1/k with k = E[d]/N
    # of the current stage, the mean positions a pool layer runs per micro-batch; 1 in the
    # last stage)
    update_scale: str = "none"


@dataclass
class ParallelConfig:
    tp: int = 1                     # tensor-parallel size (megatron-core layers)
    pp: int = 1                     # pipeline stages (DeepSpeed pipeline engine)


@dataclass
class DataConfig:
    # Either one prefix, or a Megatron-style blend list [weight, prefix, weight, prefix, ...].
    prefix: Any = None
    # a SentencePiece .model, a tokenizer.json (or a folder with one), GPT-2 vocab.json +
    # merges.txt (or their folder) or a .tiktoken file; the kind is detected unless
    # tokenizer_type names it (sentencepiece, huggingface, gpt2, tiktoken)
    tokenizer: str | None = None
    tokenizer_type: str = "auto"
    split: str = "98,2,0"           # train,valid,test document weights of every blend member
    # separate held-out data (a prefix or blend, like data.prefix): when either is set,
    # training reads all of data.prefix, evaluation all of valid_prefix; data.split is unused
    valid_prefix: Any = None
    test_prefix: Any = None         # separate test data, like valid_prefix
    cache_dir: str | None = None    # index cache; default <out_dir>/index_cache


@dataclass
class TrainConfig:
    steps: int = 100                # optimizer steps of the whole run
    micro_batch: int = 4            # sequences per rank per forward
    global_batch: int = 8           # sequences per optimizer step (accumulation fills the gap)
    lr: float = 1e-3                # peak learning rate
    min_lr: float = 0.0             # learning rate at the end of the schedule
    warmup: float = 0.025           # fraction of steps (<1) or a number of steps (>=1)
    weight_decay: float = 0.01      # AdamW decoupled weight decay (not on norms and biases)
    beta1: float = 0.9              # Adam beta1
    beta2: float = 0.95             # Adam beta2
    grad_clip: float = 1.0          # global gradient-norm clip (0: none)
    optimizer: str = "adamw"        # adamw: torch AdamW object; torch_adam: DeepSpeed config AdamW
    seed: int = 1234                # init, data order, depth sampling and dropout seed
    out_dir: str = "runs/default"   # run directory: checkpoints, metrics, logs
    save_interval: int = 0          # 0: only at the end
    eval_interval: int = 0          # 0: only at the end
    eval_iters: int = 4             # global batches of held-out samples per evaluation
    log_interval: int = 10          # steps between log lines
    deepspeed_config: str = "ds_configs/zero1_fp32.json"  # ZeRO stage and precision
    stop_after: int = 0             # >0: stop (with a checkpoint) after this step; for tests
    check_plan_agreement: bool = False  # check every rank drew the same plan each step
    # activation recompute: full re-runs every transformer layer in backward, selective only
    # the attention core (softmax(QK^T)V), none keeps every activation
    recompute: str = "none"
    # torch.compile each transformer block (one compiled function per block class, shared by
    # every pool layer and position); not with ZeRO-3
    compile: bool = False
    keep_checkpoints: int = 0       # >0: keep only the newest K checkpoints (0: keep all)
    # A step whose loss or gradient norm is NaN/inf never reaches the optimizer. stop: exit 3,
    # the newest checkpoint untouched; skip: drop the step (no update; its data is consumed)
    # and go on, stopping at more than max_skipped such steps in a row
    on_nonfinite: str = "stop"
    max_skipped: int = 10           # on_nonfinite=skip: most non-finite steps in a row
    # a step, save, expansion or evaluation (a collective waiting on a dead peer) that makes no
    # progress for this long ends the process with one line (Megatron's
    # --distributed-timeout-minutes); also the process group's collective timeout
    dist_timeout_minutes: float = 10.0
    # cosine: warmup, then cosine to min_lr at train.steps. wsd (warmup-stable-decay): warmup,
    # constant lr, then linear decay to min_lr over the last train.decay of the run; the decay
    # must start after the last Apollo expansion
    lr_schedule: str = "cosine"
    decay: float = 0.0              # wsd decay length: fraction (<1) or steps (>=1); 0: the
                                    # whole last Apollo stage (the whole run after warmup
                                    # without Apollo)
    rewarmup_steps: int = 0         # >0: after each expansion, ramp the lr linearly from
                                    # schedule/K to the schedule over K steps
    lr_after_growth: float = 1.0    # after the last expansion the lr's height above min_lr
                                    # is this times the schedule's (a higher peak for the
                                    # grown model, still ending at min_lr); 1: unchanged
    # a fresh run starts from these weights (fresh optimizer and lr schedule): a run
    # directory (its newest checkpoint) or a Hugging Face GPT-2/Llama export; a source with
    # fewer layers fills the pool at step 1 by apollo.grow; ignored when out_dir resumes
    init_from: str = ""
    init_from_tag: str = ""         # with init_from a run directory: this tag (step_NNNNNNN)
    # deliberate changes a resume accepts (and logs) instead of refusing: any of data,
    # tokenizer, global_batch, seed
    allow_changes: list = field(default_factory=list)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    apollo: ApolloConfig = field(default_factory=ApolloConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(RunConfig)}


def _section_classes():
    return {"model": ModelConfig, "apollo": ApolloConfig, "parallel": ParallelConfig,
            "data": DataConfig, "train": TrainConfig}


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    """Keep YAML's typing, but turn ints given for float settings into floats and refuse
    obviously wrong types (a string for a number)."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{section}.{key}={value!r}: expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{section}.{key}={value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{section}.{key}={value!r}: expected a number")
        return float(value)
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"{section}.{key}={value!r}: expected a list such as [1,3,6]")
    return value


def _apply(cfg: RunConfig, section: str, key: str, value: Any, origin: str) -> None:
    classes = _section_classes()
    if section not in classes:
        raise ConfigError(f"unknown config section '{section}' in {origin}; "
                          f"sections are: {', '.join(classes)}")
    sec = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(sec)}
    if key not in names:
        raise ConfigError(f"unknown config key '{section}.{key}' in {origin}; "
                          f"known keys of '{section}': {', '.join(sorted(names))}")
    setattr(sec, key, _coerce(section, key, value, getattr(classes[section](), key)))


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"bad override '{text}': write section.key=value, e.g. model.layers=6")
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return section, key, value


def load_config(path: str | None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Preset file, then overrides; not yet validated (call ``validate``)."""
    cfg = RunConfig()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path} (presets live in configs/)")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                # one line: PyYAML's message spans several (context, marks, caret)
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                what = getattr(e, "problem", None) or " ".join(str(e).split())
                raise ConfigError(f"config file {path} is not valid YAML{where}: {what}; fix "
                                  f"the syntax (a mapping of sections of key: value)") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must be a mapping of sections")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"section '{section}' in {path} must be a mapping")
            for key, value in values.items():
                _apply(cfg, section, key, value, path)
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "command-line override")
    if not cfg.apollo.stages:
        cfg.apollo.stages = [cfg.model.layers]
    return cfg


def stage_end_steps(cfg: RunConfig) -> list[int]:
    """Last optimizer step (1-based, inclusive) of every stage; the last stage ends at
    train.steps. Fractions (floats < 1) are of train.steps; integers are step numbers."""
    steps = cfg.train.steps
    ends = []
    for e in cfg.apollo.stage_ends:
        if isinstance(e, float) and e < 1.0:
            ends.append(int(round(e * steps)))
        else:
            ends.append(int(e))
    return ends + [steps]


def warmup_steps(cfg: RunConfig) -> int:
    t = cfg.train
    return int(t.warmup) if t.warmup >= 1 else int(round(t.warmup * t.steps))


def wsd_decay_start(cfg: RunConfig) -> int:
    """Last step at the constant lr of the wsd schedule: the decay covers the steps after it.
    train.decay=0: the decay starts right after the last expansion (or after the warmup
    without one)."""
    t = cfg.train
    if t.decay > 0:
        length = int(round(t.decay * t.steps)) if t.decay < 1 else int(t.decay)
        return t.steps - length
    ends = stage_end_steps(cfg)
    return max(ends[-2] if cfg.apollo.enabled and len(ends) > 1 else 0, warmup_steps(cfg))


def validate(cfg: RunConfig, world_size: int | None = None, check_files: bool = True) -> RunConfig:
    """Refuse bad settings with one clear ConfigError. ``check_files=False`` skips the checks
    that files exist (used by ``apollo-ds plan``, which needs no data)."""
    m, a, p, d, t = cfg.model, cfg.apollo, cfg.parallel, cfg.data, cfg.train
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for name in ("layers", "hidden", "heads", "seq_len", "vocab_size", "ffn_mult"):
        need(getattr(m, name) >= 1, f"model.{name}={getattr(m, name)} must be >= 1")
    need(m.hidden % m.heads == 0,
         f"model.heads={m.heads} does not divide model.hidden={m.hidden}; pick heads so "
         f"hidden/heads is an integer")
    need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    need(m.arch in ARCHS, f"model.arch='{m.arch}' is unknown; choose one of {', '.join(ARCHS)}")
    kv = kv_heads_of(m)
    need(m.kv_heads >= 0 and m.heads % kv == 0,
         f"model.kv_heads={m.kv_heads} must divide model.heads={m.heads} (0: as many as heads)")
    need(m.arch == "llama" or kv == m.heads,
         f"model.kv_heads={m.kv_heads}: grouped-query attention needs model.arch=llama")
    need(m.arch == "llama" or m.tie_embeddings in (None, True),
         "model.tie_embeddings=false needs model.arch=llama (GPT-2 ties its LM head)")
    need(m.arch != "llama" or (m.hidden // m.heads) % 2 == 0,
         f"model.arch=llama: the head size hidden/heads={m.hidden // m.heads} must be even "
         f"(rotary embeddings rotate pairs)")
    need(m.tie_embeddings in (None, True, False),
         f"model.tie_embeddings={m.tie_embeddings!r}: expected true or false")
    need(m.ffn_hidden >= 0 and m.rope_theta > 0,
         "model.ffn_hidden must be >= 0 and model.rope_theta > 0")

    need(p.tp >= 1 and p.pp >= 1, "parallel.tp and parallel.pp must be >= 1")
    need(m.heads % p.tp == 0,
         f"parallel.tp={p.tp} does not divide model.heads={m.heads}; use a tp that divides it")
    need(kv % p.tp == 0,
         f"parallel.tp={p.tp} does not divide model.kv_heads={kv}; use a tp that divides it "
         f"(each TP rank holds whole key/value heads)")
    need(ffn_width(m) % p.tp == 0,
         f"parallel.tp={p.tp} does not divide the MLP width {ffn_width(m)} (model.ffn_hidden)")
    need(p.pp <= m.layers,
         f"parallel.pp={p.pp}: more pipeline stages than the final depth model.layers="
         f"{m.layers}; use pp <= {m.layers} (supported: tp dividing model.heads; pp=1 with "
         f"ZeRO 0/1/2/3, pp>1 with ZeRO 0/1)")
    need(p.pp == 1 or a.grow == "interpolate",
         f"parallel.pp={p.pp} needs apollo.grow=interpolate (pipeline stages hold the pool "
         f"layers of a monotone layer map); apollo.grow={a.grow} is supported at pp=1 only")
    if world_size is not None:
        need(world_size % (p.tp * p.pp) == 0,
             f"world size {world_size} is not a multiple of parallel.tp*parallel.pp="
             f"{p.tp * p.pp}; launch tp*pp*dp processes")

    need(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    need(t.micro_batch >= 1, f"train.micro_batch={t.micro_batch} must be >= 1")
    need(t.global_batch >= 1, f"train.global_batch={t.global_batch} must be >= 1")
    dp = (world_size // (p.tp * p.pp)) if world_size else 1
    need(t.global_batch % (t.micro_batch * dp) == 0,
         f"train.global_batch={t.global_batch} is not divisible by train.micro_batch="
         f"{t.micro_batch} x data-parallel size {dp}; make it a multiple of "
         f"{t.micro_batch * dp}")
    need(t.lr > 0, f"train.lr={t.lr} must be > 0")
    need(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr]")
    need(t.warmup >= 0, f"train.warmup={t.warmup} must be >= 0")
    need(t.optimizer in OPTIMIZERS, f"train.optimizer='{t.optimizer}' is unknown; "
         f"choose one of {', '.join(OPTIMIZERS)}")
    need(t.recompute in RECOMPUTE, f"train.recompute='{t.recompute}' is unknown; choose one "
         f"of {', '.join(RECOMPUTE)} (selective: recompute the attention core in backward; "
         f"full: every transformer layer)")
    need(t.on_nonfinite in ON_NONFINITE, f"train.on_nonfinite='{t.on_nonfinite}' is unknown; "
         f"choose one of {', '.join(ON_NONFINITE)} (skip drops a non-finite step, stop exits)")
    for name in ("save_interval", "eval_interval", "stop_after", "keep_checkpoints",
                 "max_skipped"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0")
    need(t.log_interval >= 1, "train.log_interval must be >= 1")
    need(math.isfinite(t.dist_timeout_minutes) and t.dist_timeout_minutes > 0,
         f"train.dist_timeout_minutes={t.dist_timeout_minutes} must be a positive number of "
         f"minutes (default 10)")
    need(t.eval_iters >= 1, "train.eval_iters must be >= 1")
    bad = [c for c in t.allow_changes if c not in ALLOW_CHANGES]
    need(not bad, f"train.allow_changes={t.allow_changes}: {bad[0] if bad else ''} cannot be "
         f"allowed; choose from {', '.join(ALLOW_CHANGES)} (the model and the Apollo "
         f"schedule never change on resume)")
    need(isinstance(t.init_from, str) and isinstance(t.init_from_tag, str),
         "train.init_from and train.init_from_tag must be paths / tag names")
    need(not t.init_from_tag or bool(t.init_from),
         f"train.init_from_tag={t.init_from_tag} needs train.init_from (the run directory)")
    need(not check_files or os.path.isfile(t.deepspeed_config),
         f"DeepSpeed config not found: {t.deepspeed_config} (train.deepspeed_config or "
         f"--deepspeed_config; shipped ones are in ds_configs/)")

    need(not check_files or d.prefix not in (None, "", []),
         "data.prefix is not set: give the indexed dataset prefix (PATH for PATH.bin/PATH.idx),"
         " e.g. data.prefix=data_cache/corpus_text_document (make data builds one)")
    need(not check_files or d.tokenizer not in (None, ""),
         "data.tokenizer is not set: give the tokenizer (a SentencePiece .model, a "
         "tokenizer.json, GPT-2 vocab.json + merges.txt or a .tiktoken file)")
    need(d.tokenizer_type in ("auto", "sentencepiece", "huggingface", "gpt2", "tiktoken"),
         f"data.tokenizer_type='{d.tokenizer_type}' is unknown; choose auto, sentencepiece, "
         f"huggingface, gpt2 or tiktoken")

    need(a.sampler in SAMPLERS, f"apollo.sampler='{a.sampler}' is unknown; choose one of "
         f"{', '.join(SAMPLERS)}")
    need(a.grow in GROW_METHODS, f"apollo.grow='{a.grow}' is unknown; choose one of "
         f"{', '.join(GROW_METHODS)}")
    need(a.optimizer_state in OPTIMIZER_STATE_MODES,
         f"apollo.optimizer_state='{a.optimizer_state}' is unknown; choose one of "
         f"{', '.join(OPTIMIZER_STATE_MODES)}")
    need(0.0 <= a.growth_noise <= 1.0, f"apollo.growth_noise={a.growth_noise} must be in "
         f"[0, 1] (a fraction of each tensor's std; 0 disables the noise)")
    need(a.update_scale in UPDATE_SCALES, f"apollo.update_scale='{a.update_scale}' is "
         f"unknown; choose one of {', '.join(UPDATE_SCALES)}")
    if not a.enabled:
        a.stages, a.stage_ends = [m.layers], []
    st = a.stages
    need(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in st),
         f"apollo.stages={st} must be positive integers")
    need(all(x < y for x, y in zip(st, st[1:])),
         f"apollo.stages={st} must strictly increase (unique-layer counts grow each stage)")
    need(st[-1] == m.layers, f"apollo.stages={st}: the last stage must equal model.layers="
         f"{m.layers}")
    need(len(a.stage_ends) == len(st) - 1,
         f"apollo.stage_ends={a.stage_ends} must have one entry per stage but the last "
         f"({len(st) - 1} for apollo.stages={st})")
    need(all(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0
             for e in a.stage_ends),
         f"apollo.stage_ends={a.stage_ends} must be positive fractions of train.steps or "
         f"step numbers")
    ends = stage_end_steps(cfg)
    need(all(x < y for x, y in zip(ends, ends[1:])),
         f"apollo.stage_ends={a.stage_ends} (steps {ends[:-1]}) must be in increasing order "
         f"and end before train.steps={t.steps}")
    need(ends[0] >= 1, f"apollo.stage_ends={a.stage_ends}: the first stage ends at step "
         f"{ends[0]}; every stage needs at least one step")
    _validate_schedule(cfg, ends, need)
    return cfg


def _validate_schedule(cfg: RunConfig, ends: list[int], need) -> None:
    """train.lr_schedule / decay / rewarmup_steps against the stage ends."""
    t = cfg.train
    need(t.lr_schedule in LR_SCHEDULES, f"train.lr_schedule='{t.lr_schedule}' is unknown; "
         f"choose one of {', '.join(LR_SCHEDULES)}")
    need(t.decay >= 0, f"train.decay={t.decay} must be >= 0 (0: decay over the last stage)")
    need(t.decay == 0 or t.lr_schedule == "wsd", f"train.decay={t.decay} applies to "
         f"train.lr_schedule=wsd only; set train.lr_schedule=wsd or train.decay=0")
    need(t.rewarmup_steps >= 0, f"train.rewarmup_steps={t.rewarmup_steps} must be >= 0")
    need(math.isfinite(t.lr_after_growth) and 0 < t.lr_after_growth <= 100,
         f"train.lr_after_growth={t.lr_after_growth} must be in (0, 100] (1: the schedule "
         f"unchanged; 2: twice its height above min_lr after the last expansion)")
    expansions = ends[:-1] if cfg.apollo.enabled else []
    if t.lr_schedule == "wsd":
        start, last = wsd_decay_start(cfg), (expansions[-1] if expansions else 0)
        need(last <= start < t.steps, f"train.decay={t.decay} starts the wsd decay after "
             f"step {start}, outside steps {last}..{t.steps - 1} (after the last expansion, at "
             f"step {last}, and before train.steps); shorten train.decay or use 0")
        need(start >= warmup_steps(cfg), f"train.decay={t.decay} starts the wsd decay after "
             f"step {start}, inside the warmup ({warmup_steps(cfg)} steps); shorten it")
    stage_lengths = [y - x for x, y in zip(ends, ends[1:])]
    need(not expansions or t.rewarmup_steps <= min(stage_lengths),
         f"train.rewarmup_steps={t.rewarmup_steps} is longer than the shortest stage after an "
         f"expansion ({min(stage_lengths) if stage_lengths else 0} steps); use fewer steps")
