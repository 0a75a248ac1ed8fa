"""apollo_ds GPT-2 parameters -> Hugging Face ``GPT2LMHeadModel`` (state dict and config).

One of the exporter's mappers (to_hf.MAPPERS): ``ARCH``, ``tied``, ``hf_config`` and
``hf_state``. Conv1D weights are transposed; the fused QKV rows go from apollo_ds's per-head
``[heads, 3, head_dim]`` layout to GPT-2's ``[q; k; v]``. HF layer i is a copy of pool layer
``lmap[i]``."""
from __future__ import annotations

from apollo_ds.config import ConfigError

ARCH = "GPT2LMHeadModel"


def tied(model: dict) -> bool:
    return True           # GPT-2's LM head is the token embedding


def hf_state(full: dict, model: dict, n_unique: int, lmap: list[int]) -> dict:
    """GPT2LMHeadModel state dict (lm_head tied to wte, so not included)."""
    h, heads = int(model["hidden"]), int(model["heads"])
    hd = h // heads
    need = {"word_embeddings.weight", "position_embeddings.weight", "final_norm.weight",
            "final_norm.bias"}
    missing = sorted(need - full.keys())
    missing += [f"pool.{j}" for j in range(n_unique) if f"pool.{j}.qkv.weight" not in full]
    if missing:
        raise ConfigError(f"checkpoint lacks {', '.join(missing)}")
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


def hf_config(model: dict, tok_ids: dict):
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


# ----------------------------------------------------------------------------- the inverse
def model_of_hf(conf: dict) -> dict:
    """The apollo_ds model settings of a GPT2LMHeadModel config.json (train.init_from)."""
    h = int(conf["n_embd"])
    return {"arch": "gpt2", "layers": int(conf["n_layer"]), "hidden": h,
            "heads": int(conf["n_head"]), "seq_len": int(conf["n_positions"]),
            "vocab_size": int(conf["vocab_size"]),
            "ffn_mult": int(conf.get("n_inner") or 4 * h) // h, "tie_embeddings": True}


_LAYER = {"input_norm.weight": "ln_1.weight", "input_norm.bias": "ln_1.bias",
          "proj.bias": "attn.c_proj.bias", "mlp_norm.weight": "ln_2.weight",
          "mlp_norm.bias": "ln_2.bias", "fc1.bias": "mlp.c_fc.bias",
          "fc2.bias": "mlp.c_proj.bias"}
_CONV = {"proj.weight": "attn.c_proj.weight", "fc1.weight": "mlp.c_fc.weight",
         "fc2.weight": "mlp.c_proj.weight"}   # Conv1D: stored [in, out]
_TOP = {"word_embeddings.weight": "transformer.wte.weight",
        "position_embeddings.weight": "transformer.wpe.weight",
        "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}


def from_hf(name: str, layer: int | None, get, model: dict):
    """The inverse of ``hf_state`` for one apollo_ds parameter: ``name`` is its canonical name
    (``pool.<j>.`` stripped when ``layer`` is the HF layer to read), ``get(hf_key)`` reads one
    HF tensor. Full (TP-unsharded) fp32, vocabulary rows unpadded."""
    if layer is None:
        return get(_TOP[name])
    h, heads = int(model["hidden"]), int(model["heads"])
    q = f"transformer.h.{layer}."
    if name in _LAYER:
        return get(q + _LAYER[name])
    if name in _CONV:
        return get(q + _CONV[name]).t().contiguous()
    if name == "qkv.weight":   # [q; k; v] rows -> per-head [heads, 3, head_dim]
        w = get(q + "attn.c_attn.weight").t()
        return w.reshape(3, heads, h // heads, h).transpose(0, 1).reshape(3 * h, h).contiguous()
    if name == "qkv.bias":
        b = get(q + "attn.c_attn.bias")
        return b.reshape(3, heads, h // heads).transpose(0, 1).reshape(3 * h).contiguous()
    raise KeyError(name)
