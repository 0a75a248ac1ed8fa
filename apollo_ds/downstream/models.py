"""One interface over the two places a trained model lives: a native apollo_ds checkpoint
(its layout-free ``params/`` copy, run as apollo_ds's own PoolGPT at TP=1 in this process) and
a Hugging Face export (``AutoModelForCausalLM``). Both give ``logits(tokens)`` over the real
vocabulary and share the tokenizer semantics (SentencePiece ids), so a number measured on one
can be compared with the other."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import torch

from apollo_ds import rundir
from apollo_ds.config import ConfigError


@dataclass
class LoadedModel:
    kind: str               # "native" or "hf"
    name: str               # what was loaded, for messages
    seq_len: int
    vocab_size: int
    eod: int | None
    encode: object          # str -> list[int]
    decode: object          # list[int] -> str
    _forward: object        # [b, s] long -> [b, s, vocab] float
    decoder: object = None  # () -> a kv_cache decoder (start/step) over the same weights

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens)[..., :self.vocab_size].float()


def _is_hf_dir(path: str) -> bool:
    """An export: its config.json, and not a run directory (an export written into a run
    directory must never shadow the run's own checkpoint)."""
    return os.path.isfile(os.path.join(path, "config.json")) and not rundir.is_run_dir(path)


def _single_process_group() -> None:
    """PoolGPT is built from megatron-core layers, which need a (1-rank) process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from apollo_ds import cpu_compat
    if not torch.cuda.is_available():
        cpu_compat.apply()
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def _load_native(path: str, tokenizer: str | None, device: str) -> LoadedModel:
    """PoolGPT at TP=1 from the checkpoint's layout-free params/: every tensor checked against
    the recorded shape and this model's (only vocabulary rows are padded)."""
    from apollo_ds.apollo.layer_maps import layer_map
    from apollo_ds.config import model_config_of
    from apollo_ds.data.tokenizer import load_tokenizer
    tag_dir, state = rundir.open_checkpoint(path)
    reader = rundir.param_reader(tag_dir)
    _single_process_group()
    from apollo_ds.model import PoolGPT
    cfg = model_config_of(state["model"])
    model = PoolGPT(cfg, int(state["n_unique"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = reader.read(name, padded_rows=p.shape[0], expect=tuple(p.shape),
                            keys=("param",))["param"]
            p.copy_(t)
    model = model.to(device).eval()
    lmap = layer_map(model.n_unique, cfg.layers, (state.get("apollo") or {}).get(
        "grow", "interpolate"))
    tok_path = tokenizer or (state.get("data") or {}).get("tokenizer")
    if not tok_path:
        raise ConfigError(f"{tag_dir} does not record its tokenizer; pass --tokenizer PATH.model")
    tok = load_tokenizer(tok_path)
    from apollo_ds.downstream.kv_cache import NativeDecoder
    return LoadedModel("native", tag_dir, cfg.seq_len, cfg.vocab_size, tok.eod, tok.encode,
                       tok.decode, lambda t: model(t.to(device), lmap),
                       lambda: NativeDecoder(model, lmap))


def _load_hf(path: str, device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apollo_ds.downstream.kv_cache import HFDecoder
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a loadable Hugging Face model directory ({e}); "
                          f"export one with python -m apollo_ds.convert.to_hf") from None
    model = model.to(device).eval()
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    seq = conf.get("n_positions") or conf.get("max_position_embeddings")
    return LoadedModel("hf", path, int(seq), int(conf["vocab_size"]), tok.eos_token_id,
                       lambda s: tok.encode(s, add_special_tokens=False),
                       lambda ids: tok.decode(ids),
                       lambda t: model(t.to(device)).logits,
                       lambda: HFDecoder(model, int(conf["vocab_size"])))


def load(path: str, tokenizer: str | None = None, device: str | None = None) -> LoadedModel:
    """A run directory / checkpoints dir / tag dir (native) or an exported HF directory."""
    if not os.path.isdir(path):
        raise ConfigError(f"--checkpoint {path}: no such directory; give a run's train.out_dir,"
                          f" a checkpoint tag directory or an exported Hugging Face directory")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_hf_dir(path):
        return _load_hf(path, device)
    return _load_native(path, tokenizer, device)
