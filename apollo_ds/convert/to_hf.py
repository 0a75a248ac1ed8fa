"""Export an apollo_ds checkpoint as a Hugging Face model directory (``GPT2LMHeadModel`` or
``LlamaForCausalLM``, by the run's model.arch).

    python -m apollo_ds.convert.to_hf --checkpoint runs/demo --output hf/demo \\
        [--tokenizer PATH] [--tag step_0000200] [--dtype float32]

``--checkpoint`` is a run's ``train.out_dir``, its ``checkpoints/`` directory (the tag named in
``latest`` is used) or one tag directory. The output holds ``config.json``,
``model.safetensors``, ``generation_config.json`` and the tokenizer, so
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(DIR)`` load it offline. It must lie
outside every run directory and be new, empty or an earlier export.

A thin command over three parts, in one process without torch.distributed:

- the checkpoint's layout-free state (apollo_ds.rundir.ParamReader: full fp32 masters, TP
  shards joined, vocabulary padding dropped, every tensor checked against index.json), so any
  DP/TP/PP/ZeRO layout and precision exports the same way;
- one mapper per architecture (``MAPPERS``: hf_gpt2, hf_llama) from apollo_ds names to HF's;
  a checkpoint taken mid-Apollo (a pool of N < L unique layers) is exported at full depth L:
  HF layer i is a copy of pool layer ``layer_map(N, L)[i]``, the network the run evaluates;
- the tokenizer conversion (hf_tokenizer), checked to encode sample text to exactly the
  original's ids.

Checkpoints written before the layout-free ``params/`` copy existed are not read (resume one
once with this version, let it save, and export that)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from apollo_ds import rundir
from apollo_ds.config import ConfigError
from apollo_ds.convert import hf_gpt2, hf_llama

MAPPERS = {"gpt2": hf_gpt2, "llama": hf_llama}
EXPORT_FILES = ("config.json", "model.safetensors")   # what marks a directory as an export


class ExportError(ConfigError):
    """Bad input to the exporter; the message says what and how to fix it."""


def log(msg: str) -> None:
    print(f"to_hf: {msg}", flush=True)


# ----------------------------------------------------------------------------- locating
def resolve_checkpoint(path: str, tag: str | None = None) -> tuple[str, dict]:
    """(tag directory, run_state) for an out_dir, a checkpoints dir or a tag dir: a complete
    checkpoint with its layout-free params/ (rundir.open_checkpoint)."""
    try:
        return rundir.open_checkpoint(path, tag)
    except ConfigError as e:
        raise ExportError(str(e)) from None


def load_full_state(tag_dir: str) -> dict:
    """Unsharded fp32 apollo_ds parameters (``pool.<j>.*``, vocabulary unpadded), each
    checked against the shape its checkpoint records."""
    reader = rundir.param_reader(tag_dir)
    log(f"reading the layout-free state ({len(reader.names)} parameters) from "
        f"{reader.dir}")
    return {n: reader.read(n, keys=("param",))["param"] for n in reader.names}


def check_output(output: str) -> None:
    """The output is new, an empty directory or an earlier export, and lies in no run
    directory (eval/generate given the run must keep finding its checkpoint)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ExportError(f"--output {output} is a file; give a directory")
    run = rundir.inside_run_dir(output)
    if run is not None:
        raise ExportError(f"--output {output} lies inside the run directory {run}; write the "
                          f"export outside it (e.g. {os.path.abspath(run)}_hf)")
    if os.path.isdir(output) and os.listdir(output) and not all(
            os.path.isfile(os.path.join(output, f)) for f in EXPORT_FILES):
        raise ExportError(f"--output {output} is a non-empty directory that is not an earlier "
                          f"export; give a new or empty directory")


# ----------------------------------------------------------------------------- tokenizer
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
           dtype: str = "float32", sample_texts: list[str] | None = None,
           tokenizer_type: str | None = None) -> dict:
    """Write the HF directory; returns a summary (tag_dir, n_unique, layers, layer_map)."""
    from apollo_ds.apollo.layer_maps import layer_map

    t_start = time.perf_counter()
    tag_dir, state = resolve_checkpoint(checkpoint, tag)
    model = state["model"]
    n_unique, L = int(state["n_unique"]), int(model["layers"])
    log(f"checkpoint {tag_dir}: step {state.get('step')}, {n_unique}/{L} unique layers, "
        f"tp={state.get('tp', 1)}, dp={state.get('dp', 1)}")
    if tokenizer is None:
        tokenizer = default_tokenizer(state)
        if tokenizer is None:
            raise ExportError("the checkpoint does not record its tokenizer; pass --tokenizer "
                              "PATH.model (the run's data.tokenizer)")
        log(f"tokenizer {tokenizer} (recorded by the run)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    check_output(output)

    from apollo_ds.convert import hf_tokenizer
    from apollo_ds.data.tokenizer import load_tokenizer
    try:
        src_tok = load_tokenizer(tokenizer, tokenizer_type)
    except ConfigError as e:
        raise ExportError(f"{e}; pass --tokenizer PATH (the run's data.tokenizer)") from None
    tok, tok_ids, n_pieces = hf_tokenizer.build(src_tok, int(model["seq_len"]))
    if n_pieces > int(model["vocab_size"]):
        raise ExportError(f"tokenizer {tokenizer} has {n_pieces} pieces but the checkpoint's "
                          f"model.vocab_size is {model['vocab_size']}; pass the run's tokenizer")
    if n_pieces < int(model["vocab_size"]):
        log(f"note: the tokenizer has {n_pieces} pieces; the model keeps all "
            f"{model['vocab_size']} rows of model.vocab_size (ids >= {n_pieces} unused)")

    import torch
    arch_name = model.get("arch", "gpt2")
    if arch_name not in MAPPERS:
        raise ExportError(f"model.arch={arch_name} has no Hugging Face mapper; known: "
                          f"{', '.join(MAPPERS)}")
    mapper = MAPPERS[arch_name]
    full = load_full_state(tag_dir)
    grow = (state.get("apollo") or {}).get("grow", "interpolate")
    lmap = layer_map(n_unique, L, grow)
    if n_unique < L:
        rule = "floor(i*N/L)" if grow == "interpolate" else "cyclic"
        log(f"pool holds {n_unique} < {L} unique layers (checkpoint mid-Apollo): exporting the "
            f"full-depth network, HF layer i = pool layer {rule} ({grow}) = {lmap}")
    else:
        log(f"pool holds all {L} layers: HF layer i = pool layer i")
    import transformers
    from transformers import GenerationConfig
    torch_dtype = getattr(torch, dtype)
    try:
        sd = mapper.hf_state(full, model, n_unique, lmap)
    except RuntimeError as e:     # a view of a tensor whose recorded shape is not the config's
        raise ExportError(f"checkpoint {tag_dir}: its tensors do not fit model {model} "
                          f"({str(e)[:160]}); the checkpoint is corrupt") from None
    config, arch, tied = mapper.hf_config(model, tok_ids), mapper.ARCH, mapper.tied(model)
    hf = getattr(transformers, arch)(config)
    want = hf.state_dict()
    for k, v in sd.items():
        if k in want and tuple(want[k].shape) != tuple(v.shape):
            raise ExportError(f"{arch} parameter {k} has shape {list(want[k].shape)} but the "
                              f"checkpoint ({tag_dir}) gives {list(v.shape)}; the checkpoint "
                              f"is corrupt or of another model")
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
                           pad_token_id=tok_ids.get("pad"))
    gen.save_pretrained(output)
    tok.save_pretrained(output)
    n_checked = hf_tokenizer.check(output, src_tok, hf_tokenizer.SAMPLES
                                   + list(sample_texts or []), log)
    n_params = sum(p.numel() for p in hf.parameters())
    log(f"tokenizer ({src_tok.kind}): {n_pieces} ids, identical to the original on "
        f"{n_checked} texts")
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
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the run's tokenizer (default: the one the run recorded)")
    p.add_argument("--tokenizer-type", default=None,
                   help="sentencepiece, huggingface, gpt2 or tiktoken (default: detected)")
    p.add_argument("--tag", help="checkpoint tag to export instead of the one in `latest`")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default float32)")
    a = p.parse_args(argv)
    try:
        export(a.checkpoint, a.output, a.tokenizer, a.tag, a.dtype,
               tokenizer_type=a.tokenizer_type)
    except ConfigError as e:
        print(f"to_hf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
