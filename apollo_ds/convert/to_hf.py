"""Export an apollo_ds checkpoint as a Hugging Face ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` directory.

    python -m apollo_ds.convert.to_hf --checkpoint runs/demo [--output hf/demo] \\
        [--tokenizer .cache/apollo_ds/data/spm8k.model] [--tag step_0000200] [--dtype float32]

``--checkpoint`` is a run's ``train.out_dir``, its ``checkpoints/`` directory (the tag named in
``latest`` is used) or one tag directory. The output holds ``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer (``tokenizer.json`` +
``tokenizer_config.json``), so ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(DIR)``
load it offline.

Runs in one process, without torch.distributed, from checkpoints written at any ZeRO stage
0-3, any tensor-parallel size and fp32 or bf16:

- weights are the fp32 masters where the checkpoint has them (ZeRO 1-3 optimizer partitions,
  merged with DeepSpeed's own ``zero_to_fp32``; the bf16 optimizer's ``fp32_groups`` at ZeRO 0),
  else the module weights (fp32 ZeRO 0);
- tensor-parallel shards (``mp_rank_XX``) are concatenated along each parameter's partition
  dimension, and the vocabulary padding rows are dropped;
- names are mapped to GPT-2's (Conv1D weights transposed; QKV rows reordered from apollo_ds's
  per-head ``[heads, 3, head_dim]`` layout to GPT-2's ``[q; k; v]``);
- a checkpoint taken mid-Apollo (a pool of N < L unique layers) is exported at full depth L:
  HF layer i is a copy of pool layer ``layer_map(N, L)[i]`` (``floor(i*N/L)`` with
  interpolation), the network the run itself evaluates at depth L.

The tokenizer is the run's SentencePiece model converted to a ``tokenizers`` BPE/Unigram
tokenizer that follows the model's own normalizer settings; the export checks that it encodes
sample text to exactly the SentencePiece ids and refuses otherwise. No BOS/EOS is added
(apollo_ds trains on raw ``encode()`` ids, EOD-separated), and special-token strings in text are
encoded as text, as SentencePiece does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time

from apollo_ds.config import ConfigError

RUN_STATE = "run_state.json"
LATEST = "latest"

# Tensor-parallel partition dimension of each sharded apollo_ds parameter (by name suffix);
# everything else (norms, positions, row-parallel biases) is replicated across TP ranks.
_TP_DIM = {"qkv.weight": 0, "qkv.bias": 0, "fc1.weight": 0, "fc1.bias": 0,
           "word_embeddings.weight": 0, "proj.weight": 1, "fc2.weight": 1}

# Sample strings for the tokenizer round-trip check (besides the caller's own text).
_TOKENIZER_SAMPLES = [
    "Hello world! This is a test of the exported tokenizer.",
    "  leading and  double  spaces, trailing space ",
    "digits 1234567890 and 3.14159; punctuation: (a) [b] {c} -- \"quoted\" 'single'",
    "Unicode: caf\u00e9 na\u00efve \u00dcber \u65e5\u672c\u8a9e \u2603 \U0001F600",
    "tab\tseparated\nnew line",
    "",
    " ",
]


_UNREACHABLE = -1e6       # Unigram score for pieces SentencePiece never matches in text


# Text spelling SentencePiece's control and byte pieces: SentencePiece encodes it as text. The
# BPE conversion does too; a Unigram one can pick the control/byte piece when the text's
# characters are not all in the vocabulary (tokenizers' Unigram has no unmatchable pieces), so
# for Unigram a difference here is reported, not refused.
_LITERAL_SPECIALS = "<s> and </s> and <unk> and <pad> are text here, as are <0x41> and <0xE2>"


class ExportError(ConfigError):
    """Bad input to the exporter; the message says what and how to fix it."""


def log(msg: str) -> None:
    print(f"to_hf: {msg}", flush=True)


# ----------------------------------------------------------------------------- locating
def resolve_checkpoint(path: str, tag: str | None = None) -> tuple[str, dict]:
    """(tag directory, run_state) for an out_dir, a checkpoints dir or a tag dir."""
    if not os.path.exists(path):
        raise ExportError(f"checkpoint path {path} does not exist; give a run's train.out_dir, "
                          f"its checkpoints/ directory or one checkpoint tag directory")
    if not os.path.isdir(path):
        raise ExportError(f"checkpoint path {path} is not a directory; give a run's "
                          f"train.out_dir, its checkpoints/ directory or a tag directory")
    if tag is None and os.path.isfile(os.path.join(path, RUN_STATE)):
        tag_dir = path
    else:
        ckpt = path
        sub = os.path.join(path, "checkpoints")
        if not os.path.exists(os.path.join(path, LATEST)) and os.path.isdir(sub):
            ckpt = sub
        if tag is None:
            marker = os.path.join(ckpt, LATEST)
            if not os.path.isfile(marker):
                tags = sorted(d for d in os.listdir(ckpt)
                              if os.path.isdir(os.path.join(ckpt, d)))
                hint = (f" (tag directories there: {', '.join(tags[-5:])}; pass one of them, "
                        f"or --tag)" if tags else "")
                raise ExportError(f"no `{LATEST}` file in {ckpt}: not a checkpoint directory, "
                                  f"or no checkpoint was completed yet{hint}")
            with open(marker) as f:
                tag = f.read().strip()
            if not tag:
                raise ExportError(f"{marker} is empty; pass a tag directory instead")
        tag_dir = os.path.join(ckpt, tag)
        if not os.path.isdir(tag_dir):
            raise ExportError(f"checkpoint tag {tag} is missing: no directory {tag_dir}")
    state_path = os.path.join(tag_dir, RUN_STATE)
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"checkpoint {tag_dir} is incomplete or corrupt: cannot read "
                          f"{RUN_STATE} ({e}); export an older tag") from None
    _check_manifest(tag_dir)
    for key in ("n_unique", "model", "tp"):
        if key not in state:
            raise ExportError(f"{state_path} has no '{key}': not an apollo_ds checkpoint, or "
                              f"written by an incompatible version")
    if state.get("pp", 1) != 1 and not os.path.isfile(os.path.join(tag_dir, "params",
                                                                    "index.json")):
        raise ExportError(f"{tag_dir} was written with parallel.pp={state['pp']} before "
                          f"checkpoints had a layout-free params/ copy; resume it once and "
                          f"save (any layout), then export the new checkpoint")
    return os.path.abspath(tag_dir), state


def _check_manifest(tag_dir: str) -> None:
    """Every file the checkpoint's manifest lists is there with its size (checksums are the
    resume's job: reading them all here would double the export's I/O)."""
    path = os.path.join(tag_dir, "manifest.json")
    if not os.path.isfile(path):
        return      # written before checkpoints had manifests
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"checkpoint {tag_dir} is corrupt: cannot read manifest.json ({e}); "
                          f"export an older tag") from None
    for rel, meta in sorted(files.items()):
        full = os.path.join(tag_dir, rel)
        if not os.path.isfile(full) or os.path.getsize(full) != meta["size"]:
            raise ExportError(f"checkpoint {tag_dir} is incomplete: {rel} is missing or "
                              f"truncated (manifest.json); export an older tag")


def _model_state_files(tag_dir: str, tp: int, dp: int) -> tuple[bool, dict[int, list[str]]]:
    """(ZeRO-3 layout?, mp rank -> model-state files); refuses missing files."""
    zero3 = os.path.isfile(os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"))
    files, missing = {}, []
    for r in range(tp):
        if zero3:
            names = [f"zero_pp_rank_{d}_mp_rank_{r:02d}_model_states.pt" for d in range(dp)]
        else:
            names = [f"mp_rank_{r:02d}_model_states.pt"]
        files[r] = [os.path.join(tag_dir, n) for n in names]
        missing += [n for n in names if not os.path.isfile(os.path.join(tag_dir, n))]
    if missing:
        raise ExportError(f"checkpoint {tag_dir} is incomplete: missing {', '.join(missing)} "
                          f"(expected tp={tp}, dp={dp}); export an older tag")
    return zero3, files


def _optim_files(tag_dir: str, r: int) -> list[str]:
    pat = re.compile(rf"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_{r:02d}_optim_states\.pt$")
    found = [(int(m.group(2)), n) for n in os.listdir(tag_dir) if (m := pat.match(n))]
    return [os.path.join(tag_dir, n) for _, n in sorted(found)]


# ----------------------------------------------------------------------------- reading
def _torch_load(path: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt file, whatever torch says
        raise ExportError(f"cannot read {path} ({type(e).__name__}: {e}); the checkpoint is "
                          f"incomplete or corrupt, export an older tag") from None


def _param_names(module_sd: dict) -> list[str]:
    return [k for k, v in module_sd.items()
            if v is not None and not k.endswith("_extra_state") and hasattr(v, "shape")]


def _masters_zero(tag_dir: str, r: int, model_files: list[str], optim: list[str]) -> dict:
    """fp32 masters of mp rank ``r`` from ZeRO 1/2/3 partitions, through DeepSpeed's own
    zero_to_fp32 (which reads one mp rank at a time: give it rank r's files as rank 0's)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with tempfile.TemporaryDirectory(prefix="apollo_to_hf_") as tmp:
        view = os.path.join(tmp, "tag")
        os.makedirs(view)
        for f in model_files + optim:
            name = os.path.basename(f).replace(f"mp_rank_{r:02d}", "mp_rank_00")
            os.symlink(f, os.path.join(view, name))
        quiet = io.StringIO()
        try:
            with contextlib.redirect_stdout(quiet):
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag")
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"DeepSpeed could not merge the ZeRO partitions of {tag_dir} (mp "
                              f"rank {r}): {type(e).__name__}: {e}") from None
    return {k: v.float() for k, v in sd.items()}


def _masters_zero0_bf16(module_sd: dict, optimizer_sd) -> dict | None:
    """ZeRO 0 + bf16: DeepSpeed's bf16 optimizer keeps unflattened fp32 copies per parameter
    group; apollo_ds builds the groups as (dim >= 2, dim < 2) in parameter order. Returns None
    unless every copy matches its parameter's shape and rounds to its bf16 value."""
    import torch
    groups = (optimizer_sd or {}).get("fp32_groups") if isinstance(optimizer_sd, dict) else None
    if not groups:
        return None
    names = _param_names(module_sd)
    order = [[n for n in names if module_sd[n].dim() >= 2],
             [n for n in names if module_sd[n].dim() < 2]]
    order = [g for g in order if g]
    if [len(g) for g in groups] != [len(g) for g in order]:
        return None
    out = {}
    for gnames, gtensors in zip(order, groups):
        for n, t in zip(gnames, gtensors):
            m = module_sd[n]
            if tuple(t.shape) != tuple(m.shape) or not torch.equal(t.to(m.dtype), m):
                return None
            out[n] = t.float()
    return out


def read_rank(tag_dir: str, r: int, files: list[str], zero3: bool) -> tuple[dict, str]:
    """Full (DP-merged) fp32 state of TP rank ``r`` and where it came from."""
    import torch
    first = _torch_load(files[0])
    if "module" not in first:
        raise ExportError(f"{files[0]} has no 'module': not a DeepSpeed model-state file")
    ds_cfg = first.get("ds_config") or {}
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 3 if zero3 else 0))
    bf16 = bool(ds_cfg.get("bf16", {}).get("enabled"))
    module = first["module"]
    optim = _optim_files(tag_dir, r)
    if stage >= 1:
        dp = first.get("dp_world_size")
        if not optim or (dp is not None and len(optim) != dp):
            raise ExportError(f"checkpoint {tag_dir} is incomplete: found {len(optim)} ZeRO "
                              f"optimizer files for mp rank {r}, expected {dp}; export an "
                              f"older tag")
        sd = _masters_zero(tag_dir, r, files, optim)
        how = f"ZeRO-{stage} fp32 masters"
        if not zero3:
            # Cross-check against the module weights DeepSpeed saved alongside.
            for n in _param_names(module):
                if n not in sd or tuple(sd[n].shape) != tuple(module[n].shape):
                    raise ExportError(f"{tag_dir}: merged ZeRO state lacks {n} or has another "
                                      f"shape than the module's")
                if not torch.equal(sd[n].to(module[n].dtype), module[n]):
                    raise ExportError(f"{tag_dir}: fp32 master of {n} does not match the saved "
                                      f"module weight; the checkpoint is inconsistent")
        return sd, how
    if bf16:
        sd = _masters_zero0_bf16(module, first.get("optimizer"))
        if sd is not None:
            return sd, "ZeRO-0 bf16 optimizer fp32 copies"
        log(f"warning: mp rank {r}: no usable fp32 copies in the bf16 ZeRO-0 checkpoint; "
            f"exporting the bf16 module weights")
        return {n: module[n].float() for n in _param_names(module)}, "bf16 module weights"
    return {n: module[n].float() for n in _param_names(module)}, "ZeRO-0 module weights"


def merge_tp(shards: list[dict], vocab_size: int) -> dict:
    """One unsharded state from TP shards; vocabulary padding dropped."""
    import torch
    out = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        dim = next((d for suffix, d in _TP_DIM.items() if name.endswith(suffix)), None)
        if dim is None or len(parts) == 1:
            t = parts[0]
            for r, p in enumerate(parts[1:], 1):
                if p.shape != t.shape or (p - t).abs().max().item() > 1e-6 * (1 + t.abs().max()):
                    raise ExportError(f"replicated parameter {name} differs between TP ranks "
                                      f"0 and {r}; the checkpoint is inconsistent")
        else:
            t = torch.cat(parts, dim=dim)
        if name.endswith("word_embeddings.weight"):
            if t.shape[0] < vocab_size:
                raise ExportError(f"embedding has {t.shape[0]} rows, fewer than "
                                  f"model.vocab_size={vocab_size}")
            t = t[:vocab_size]
        out[name] = t.contiguous()
    return out


def load_full_state(tag_dir: str, state: dict) -> dict:
    """Unsharded fp32 apollo_ds parameters (``pool.<j>.*``, vocabulary unpadded): from the
    layout-free ``params/`` files (any DP/TP/PP/ZeRO layout), else from DeepSpeed's files."""
    index = os.path.join(tag_dir, "params", "index.json")
    if os.path.isfile(index):
        import torch
        with open(index) as f:
            names = json.load(f)["params"]
        log(f"reading the layout-free state ({len(names)} parameters) from {tag_dir}/params")
        return {n: torch.load(os.path.join(tag_dir, "params", n + ".pt"), map_location="cpu",
                              weights_only=True)["param"] for n in names}
    if (state.get("model") or {}).get("arch", "gpt2") != "gpt2":
        raise ExportError(f"{tag_dir} has no params/ directory (layout-free state), which the "
                          f"export of a {state['model']['arch']} model needs")
    tp, dp = int(state["tp"]), int(state.get("dp", 1))
    zero3, files = _model_state_files(tag_dir, tp, dp)
    shards = []
    for r in range(tp):
        t0 = time.perf_counter()
        sd, how = read_rank(tag_dir, r, files[r], zero3)
        log(f"read mp rank {r}/{tp}: {len(sd)} tensors ({how}) in "
            f"{time.perf_counter() - t0:.1f}s")
        shards.append(sd)
    return merge_tp(shards, int(state["model"]["vocab_size"]))


# ----------------------------------------------------------------------------- mapping
def to_gpt2_state(full: dict, model: dict, n_unique: int, lmap: list[int]) -> dict:
    """GPT2LMHeadModel state dict (lm_head tied to wte, so not included)."""
    h, heads = int(model["hidden"]), int(model["heads"])
    hd = h // heads
    need = {"word_embeddings.weight", "position_embeddings.weight", "final_norm.weight",
            "final_norm.bias"}
    missing = sorted(need - full.keys())
    missing += [f"pool.{j}" for j in range(n_unique)
                if f"pool.{j}.qkv.weight" not in full]
    if missing:
        raise ExportError(f"checkpoint lacks {', '.join(missing)}")
    out = {"transformer.wte.weight": full["word_embeddings.weight"],
           "transformer.wpe.weight": full["position_embeddings.weight"],
           "transformer.ln_f.weight": full["final_norm.weight"],
           "transformer.ln_f.bias": full["final_norm.bias"]}
    for i, j in enumerate(lmap):
        p, q = f"pool.{j}.", f"transformer.h.{i}."
        w = full[p + "qkv.weight"].view(heads, 3, hd, h).transpose(0, 1).reshape(3 * h, h)
        b = full[p + "qkv.bias"].view(heads, 3, hd).transpose(0, 1).reshape(3 * h)
        pairs = {
            "ln_1.weight": full[p + "input_norm.weight"], "ln_1.bias": full[p + "input_norm.bias"],
            "attn.c_attn.weight": w.t(), "attn.c_attn.bias": b,
            "attn.c_proj.weight": full[p + "proj.weight"].t(),
            "attn.c_proj.bias": full[p + "proj.bias"],
            "ln_2.weight": full[p + "mlp_norm.weight"], "ln_2.bias": full[p + "mlp_norm.bias"],
            "mlp.c_fc.weight": full[p + "fc1.weight"].t(), "mlp.c_fc.bias": full[p + "fc1.bias"],
            "mlp.c_proj.weight": full[p + "fc2.weight"].t(),
            "mlp.c_proj.bias": full[p + "fc2.bias"],
        }
        # .clone(): pool layers shared by several HF layers must become separate tensors.
        out.update({q + k: v.contiguous().clone() for k, v in pairs.items()})
    return out


def gpt2_config(model: dict, tok_ids: dict):
    from transformers import GPT2Config
    return GPT2Config(
        vocab_size=int(model["vocab_size"]), n_positions=int(model["seq_len"]),
        n_embd=int(model["hidden"]), n_layer=int(model["layers"]), n_head=int(model["heads"]),
        n_inner=int(model.get("ffn_mult", 4)) * int(model["hidden"]),
        activation_function="gelu_new",        # GELU, tanh approximation
        resid_pdrop=float(model.get("dropout", 0.0)), embd_pdrop=float(model.get("dropout", 0.0)),
        attn_pdrop=float(model.get("dropout", 0.0)),
        layer_norm_epsilon=float(model.get("layernorm_eps", 1e-5)),
        initializer_range=float(model.get("init_std", 0.02)),
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False, tie_word_embeddings=True,
        bos_token_id=tok_ids.get("bos"), eos_token_id=tok_ids.get("eos"),
        pad_token_id=tok_ids.get("pad"),
    )


# ----------------------------------------------------------------------------- tokenizer
def _spm_proto(path: str):
    from transformers.convert_slow_tokenizer import import_protobuf
    pb = import_protobuf()
    proto = pb.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"tokenizer {path} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise ExportError(f"tokenizer {path} is not a SentencePiece model (no pieces)")
    return proto


def build_tokenizer(spm_path: str, max_len: int):
    """A transformers fast tokenizer equivalent to the SentencePiece model at ``spm_path``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter
    proto = _spm_proto(spm_path)
    kind = proto.trainer_spec.model_type          # 1 unigram, 2 bpe
    if kind == 2:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif kind == 1:
        # SentencePiece never produces unknown, control or byte pieces from matching text
        # ("<s>" or "<0x41>" in text stay text); tokenizers' Unigram would, at their score
        # of 0. Keep them in the vocabulary (ids, byte fallback) but out of reach.
        vocab = [(p.piece, p.score if p.type in (1, 4) else _UNREACHABLE)
                 for p in proto.pieces]
    else:
        raise ExportError(f"tokenizer {spm_path}: SentencePiece model type {kind} is not "
                          f"supported (bpe or unigram)")
    # legacy=True: SentencePiece's dummy prefix even when the text starts with a space; with
    # special tokens left unsplit (below) there is one chunk, so "always" == "first".
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if backend is None:
        raise ExportError(f"tokenizer {spm_path}: transformers could not convert it")
    ts = proto.trainer_spec
    specials = {}
    for role, pid, piece in (("bos", ts.bos_id, ts.bos_piece), ("eos", ts.eos_id, ts.eos_piece),
                             ("unk", ts.unk_id, ts.unk_piece), ("pad", ts.pad_id, ts.pad_piece)):
        if pid >= 0:
            specials[f"{role}_token"] = proto.pieces[pid].piece or piece
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                  model_max_length=max_len, clean_up_tokenization_spaces=False,
                                  **specials)
    ids = {role: pid for role, pid in (("bos", ts.bos_id), ("eos", ts.eos_id),
                                       ("unk", ts.unk_id), ("pad", ts.pad_id)) if pid >= 0}
    return tok, ids, len(proto.pieces)


def check_tokenizer(out_dir: str, spm_path: str, texts: list[str]) -> int:
    """Reload the saved tokenizer the way users will and compare ids with SentencePiece."""
    import sentencepiece as spm
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    hf = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    texts = [_LITERAL_SPECIALS] + list(texts)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()     # texts longer than model_max_length are fine here
    try:
        got_all = [hf.encode(text, add_special_tokens=True) for text in texts]
    finally:
        hf_logging.set_verbosity(level)
    unigram = _spm_proto(spm_path).trainer_spec.model_type == 1
    for text, got in zip(texts, got_all):
        want = list(sp.encode(text))
        if want != got and text is _LITERAL_SPECIALS and unigram:
            log("warning: Unigram tokenizer: text that spells a control or byte piece (e.g. "
                "'<s>') can encode to that piece where SentencePiece spells it out; ordinary "
                "text is unaffected")
            continue
        if want != got:
            raise ExportError(f"the converted tokenizer encodes {text[:60]!r} to {got[:12]}... "
                              f"but SentencePiece gives {want[:12]}...; this SentencePiece "
                              f"model's options are not supported by the conversion")
        if sp.decode(want) != hf.decode(want):
            raise ExportError(f"the converted tokenizer decodes {text[:60]!r} differently "
                              f"from SentencePiece")
    return len(texts)


def default_tokenizer(state: dict) -> str | None:
    for section in ("data", "config"):
        sec = state.get(section) or {}
        if isinstance(sec, dict):
            path = sec.get("tokenizer") or (sec.get("data") or {}).get("tokenizer")
            if path:
                return path
    return None


# ----------------------------------------------------------------------------- export
def export(checkpoint: str, output: str, tokenizer: str | None = None, tag: str | None = None,
           dtype: str = "float32", sample_texts: list[str] | None = None) -> dict:
    """Write the HF directory; returns a summary (tag_dir, n_unique, layers, layer_map)."""
    from apollo_ds.apollo.layer_maps import layer_map

    t_start = time.perf_counter()
    tag_dir, state = resolve_checkpoint(checkpoint, tag)
    model = state["model"]
    n_unique, L = int(state["n_unique"]), int(model["layers"])
    log(f"checkpoint {tag_dir}: step {state.get('step')}, {n_unique}/{L} unique layers, "
        f"tp={state['tp']}, dp={state.get('dp', 1)}")
    if tokenizer is None:
        tokenizer = default_tokenizer(state)
        if tokenizer is None:
            raise ExportError("the checkpoint does not record its tokenizer; pass --tokenizer "
                              "PATH.model (the run's data.tokenizer)")
        log(f"tokenizer {tokenizer} (recorded by the run)")
    if not os.path.isfile(tokenizer):
        raise ExportError(f"tokenizer model not found: {tokenizer}; pass --tokenizer PATH.model")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    if os.path.isfile(output):
        raise ExportError(f"--output {output} is a file; give a directory")

    tok, tok_ids, n_pieces = build_tokenizer(tokenizer, int(model["seq_len"]))
    if n_pieces > int(model["vocab_size"]):
        raise ExportError(f"tokenizer {tokenizer} has {n_pieces} pieces but the checkpoint's "
                          f"model.vocab_size is {model['vocab_size']}; pass the run's tokenizer")
    if n_pieces < int(model["vocab_size"]):
        log(f"note: the tokenizer has {n_pieces} pieces; the model keeps all "
            f"{model['vocab_size']} rows of model.vocab_size (ids >= {n_pieces} unused)")

    import torch
    full = load_full_state(tag_dir, state)
    grow = (state.get("apollo") or {}).get("grow", "interpolate")
    lmap = layer_map(n_unique, L, grow)
    if n_unique < L:
        rule = "floor(i*N/L)" if grow == "interpolate" else "cyclic"
        log(f"pool holds {n_unique} < {L} unique layers (checkpoint mid-Apollo): exporting the "
            f"full-depth network, HF layer i = pool layer {rule} ({grow}) = {lmap}")
    else:
        log(f"pool holds all {L} layers: HF layer i = pool layer i")
    from transformers import GenerationConfig
    torch_dtype = getattr(torch, dtype)
    if model.get("arch", "gpt2") == "llama":
        from transformers import LlamaForCausalLM

        from apollo_ds.config import model_config_of, tied as is_tied
        from apollo_ds.convert.hf_llama import llama_config, to_llama_state
        tied = is_tied(model_config_of(model))
        sd = to_llama_state(full, model, n_unique, lmap, tied, ExportError)
        config = llama_config(model, tok_ids, tied)
        arch, hf = "LlamaForCausalLM", LlamaForCausalLM(config)
    else:
        from transformers import GPT2LMHeadModel
        sd = to_gpt2_state(full, model, n_unique, lmap)
        config = gpt2_config(model, tok_ids)
        arch, hf = "GPT2LMHeadModel", GPT2LMHeadModel(config)
        tied = True
    config.architectures = [arch]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"internal: {arch} state mismatch (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]})")
    if tied:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    hf = hf.to(torch_dtype).eval()
    os.makedirs(output, exist_ok=True)
    hf.save_pretrained(output, safe_serialization=True)
    gen = GenerationConfig(bos_token_id=tok_ids.get("bos"), eos_token_id=tok_ids.get("eos"),
                           pad_token_id=tok_ids.get("pad"), max_length=int(model["seq_len"]))
    gen.save_pretrained(output)
    tok.save_pretrained(output)
    n_checked = check_tokenizer(output, tokenizer, _TOKENIZER_SAMPLES + list(sample_texts or []))
    n_params = sum(p.numel() for p in hf.parameters())
    log(f"tokenizer: {n_pieces} pieces, ids identical to SentencePiece on {n_checked} texts")
    log(f"wrote {output}: {arch}, {L} layers, hidden {model['hidden']}, "
        f"{n_params / 1e6:.2f} M parameters ({dtype}) in {time.perf_counter() - t_start:.1f}s")
    return {"tag_dir": tag_dir, "n_unique": n_unique, "layers": L, "layer_map": lmap,
            "state": state}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m apollo_ds.convert.to_hf",
        description="Export an apollo_ds checkpoint as a Hugging Face GPT2LMHeadModel or "
                    "LlamaForCausalLM directory (by the run's model.arch).")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run's train.out_dir, its checkpoints/ directory, or one tag directory")
    p.add_argument("--output", required=True, metavar="DIR", help="HF model directory to write")
    p.add_argument("--tokenizer", metavar="PATH.model",
                   help="the run's SentencePiece model (default: the one the run recorded)")
    p.add_argument("--tag", help="checkpoint tag to export instead of the one in `latest`")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")
    a = p.parse_args(argv)
    try:
        export(a.checkpoint, a.output, a.tokenizer, a.tag, a.dtype)
    except ConfigError as e:
        print(f"to_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
