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
