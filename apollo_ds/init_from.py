"""train.init_from: a fresh run that starts from another model's weights (continued
pretraining, annealing on a new data mix, or growing a trained smaller model into a deeper
one). Weights only: the optimizer starts fresh (zero Adam moments, step 0) and so does the lr
schedule.

The source is a run directory (its newest complete checkpoint, or train.init_from_tag; a tag
directory works too), read through rundir.param_reader, or a Hugging Face export (GPT-2 or
Llama, as apollo_ds.convert.to_hf writes it), read through the exporter's own mappers run
backwards (hf_gpt2.from_hf, hf_llama.from_hf). A source of N_src unique layers fills a pool of
N at step 1 (apollo.stages[0]; model.layers without Apollo) by the growth map of an expansion:
pool layer i = source layer ``expansion_sources(N_src, N, apollo.grow)[i]``. A source with
more layers than that pool, or of another width, head count, MLP width, architecture, or a
larger vocabulary, is refused before any work (``check``, from preflight).

The weights enter the engine as a reshaped resume's do: ``Runtime.build(n, state)`` with a
Mapping that yields each parameter's TP slice on access (the moments it leaves out are zero).
This module sits beside rundir.py, not in training/: reading an export takes the converter's
mappers (apollo_ds.convert.from_hf), which training/ itself never imports."""
from __future__ import annotations

import os
from collections.abc import Mapping

from apollo_ds import rundir
from apollo_ds.apollo.layer_maps import expansion_sources
from apollo_ds.config import ConfigError, RunConfig, ffn_width, kv_heads_of, model_config_of
from apollo_ds.config import tied as is_tied


def _is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not rundir.is_run_dir(path)


class Source:
    """A model to start from: its settings (``model``, a ModelConfig), its number of unique
    layers and ``full(name)``: one canonical apollo_ds tensor, full (TP-unsharded) fp32,
    vocabulary rows unpadded; ``pool.<j>.`` names are source layer j."""

    def __init__(self, where: str, kind: str, model: dict, n_layers: int, read):
        self.where, self.kind, self.n_layers, self._read = where, kind, n_layers, read
        self.model = model_config_of(model)

    def full(self, name: str):
        return self._read(name).float()


def _run_source(path: str, tag: str | None) -> Source:
    tag_dir, state = rundir.open_checkpoint(path, tag)
    reader = rundir.param_reader(tag_dir)

    def read(name: str):
        if name == "lm_head.weight" and name not in reader.params:   # tied source
            name = "word_embeddings.weight"
        return reader.read(name, keys=("param",))["param"]
    return Source(tag_dir, f"checkpoint at step {state.get('step')}", state["model"],
                  int(state["n_unique"]), read)


def _hf_source(path: str) -> Source:
    from apollo_ds.convert.from_hf import open_export
    try:
        model, n_layers, kind, read = open_export(path)
    except ConfigError as e:
        raise ConfigError(f"train.init_from={path}: {e}") from None
    return Source(path, kind, model, n_layers, read)


def open_source(cfg: RunConfig) -> Source:
    path, tag = cfg.train.init_from, cfg.train.init_from_tag or None
    if not os.path.isdir(path):
        raise ConfigError(f"train.init_from={path}: no such directory; give a run's "
                          f"train.out_dir, a checkpoint tag directory or a Hugging Face export")
    if _is_hf(path):
        if tag:
            raise ConfigError(f"train.init_from_tag={tag} applies to a run directory, but "
                              f"train.init_from={path} is a Hugging Face export; drop the tag")
        return _hf_source(path)
    try:
        return _run_source(path, tag)
    except ConfigError as e:
        raise ConfigError(f"train.init_from: {e}") from None


def pool_size(cfg: RunConfig) -> int:
    """Unique layers at step 1 (validated config: apollo.stages is [model.layers] without
    Apollo)."""
    return int(cfg.apollo.stages[0])


def check(src: Source, cfg: RunConfig) -> None:
    """Refuse (one ConfigError line) a source whose shapes cannot map onto the configured
    model."""
    s, m = src.model, cfg.model
    what = f"train.init_from={cfg.train.init_from} ({src.kind})"
    pairs = [("arch", s.arch, m.arch), ("hidden", s.hidden, m.hidden), ("heads", s.heads, m.heads),
             ("kv_heads", kv_heads_of(s), kv_heads_of(m)),
             ("MLP width", ffn_width(s), ffn_width(m)), ("tie_embeddings", is_tied(s), is_tied(m))]
    for key, a, b in pairs:
        if a != b:
            setting = ("the MLP width (model.ffn_mult / model.ffn_hidden) " if key == "MLP width"
                       else f"model.{key}=")
            raise ConfigError(f"{what} has {key} {a} but this model has {setting}{b}; only the "
                              f"depth may differ: set it to {a}")
    if s.vocab_size > m.vocab_size:
        raise ConfigError(f"{what} has a vocabulary of {s.vocab_size} but model.vocab_size="
                          f"{m.vocab_size}; set model.vocab_size >= {s.vocab_size}")
    if m.arch == "gpt2" and s.seq_len < m.seq_len:
        raise ConfigError(f"{what} has {s.seq_len} learned positions but model.seq_len="
                          f"{m.seq_len}; set model.seq_len <= {s.seq_len}")
    n = pool_size(cfg)
    if src.n_layers > n:
        raise ConfigError(f"{what} has {src.n_layers} unique layers but the pool holds {n} at "
                          f"step 1 (apollo.stages[0], or model.layers without Apollo); start "
                          f"the pool at >= {src.n_layers} layers")


def check_fresh(cfg: RunConfig) -> None:
    """Preflight: with train.init_from set and nothing to resume, the source opens and fits."""
    if not cfg.train.init_from:
        return
    tags, note = rundir.candidates(rundir.checkpoints_dir(cfg.train.out_dir))
    if tags or note is not None:
        return   # a resume: init_from is ignored (the Trainer says so)
    check(open_source(cfg), cfg)


class InitState(Mapping):
    """Canonical name -> {"param": this rank's slice} of the configured model, from ``src``:
    pool layer i reads source layer ``sources[i]``, vocabulary rows are zero-padded to the
    model's padded vocabulary, position rows cut to model.seq_len, then the tensor-parallel
    slice along the parameter's partition dim. Read on access, not kept. ``runtime``: the
    Runtime being built (its model's parameters give the local shapes and TP dims)."""

    def __init__(self, src: Source, cfg: RunConfig, runtime, n_unique: int):
        self.src, self.cfg, self.runtime = src, cfg, runtime
        self.sources = expansion_sources(src.n_layers, n_unique, cfg.apollo.grow)

    def _params(self) -> dict:
        # the model build() just made (looked up once per model, not per parameter)
        if getattr(self, "_model", None) is not self.runtime.model:
            self._model, self._named = self.runtime.model, dict(self.runtime.named_parameters())
        return self._named

    def __iter__(self):
        return iter(self._params())

    def __len__(self) -> int:
        return len(self._params())

    def source_name(self, name: str) -> str:
        if name.startswith("pool."):
            _, i, rest = name.split(".", 2)
            return f"pool.{self.sources[int(i)]}.{rest}"
        return name

    def __getitem__(self, name: str) -> dict:
        import torch

        from apollo_ds.model.gpt import is_vocab_rows
        p = self._params()[name]
        t = self.src.full(self.source_name(name))
        tp = self.runtime.dist.tp
        local = tuple(getattr(p, "ds_shape", p.shape))   # ZeRO-3: the partitioned shape
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) and tp > 1 else None
        if is_vocab_rows(name, p):
            rows = local[0] * (tp if dim == 0 else 1)
            t = torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])
        elif name.endswith("position_embeddings.weight"):
            t = t[:local[0]]
        if dim is not None:
            t = t.chunk(tp, dim=dim)[self.runtime.dist.tp_rank]
        if tuple(t.shape) != local:
            raise ConfigError(f"train.init_from={self.src.where}: {self.source_name(name)} has "
                              f"shape {list(t.shape)} for this model's {name} of "
                              f"{list(local)}; the source is of another model")
        return {"param": t.contiguous()}


def describe(src: Source, sources: list[int], cfg: RunConfig) -> str:
    n = len(sources)
    how = (f"pool layer i = source layer {sources} ({cfg.apollo.grow})" if src.n_layers < n
           else "layer for layer")
    return (f"initialised from {src.where} ({src.kind}, {src.n_layers} unique layers) into a "
            f"pool of {n}: {how}; weights only (fresh optimizer and lr schedule, step 0)")
