"""apollo_ds llama parameters -> Hugging Face ``LlamaForCausalLM`` (state dict and config).

The fused QKV weight is laid out per key/value group, [kv_heads, heads/kv_heads + 2, head_dim,
hidden] (model/llama.py): the group's query heads, its key head, its value head. HF keeps
separate q/k/v projections with query head i reading key/value head i // (heads/kv_heads),
which is the same order, so the split is a view; rotary embeddings use HF's rotate-half
convention on both sides, so no row permutation is needed. One of the exporter's mappers
(to_hf.MAPPERS): ``ARCH``, ``tied``, ``hf_config`` and ``hf_state``."""
from __future__ import annotations

from apollo_ds.config import ConfigError

ARCH = "LlamaForCausalLM"


def tied(model: dict) -> bool:
    from apollo_ds.config import model_config_of, tied as is_tied
    return is_tied(model_config_of(model))


def hf_state(full: dict, model: dict, n_unique: int, lmap: list[int]) -> dict:
    from apollo_ds.config import kv_heads_of, model_config_of
    m, tied_head = model_config_of(model), tied(model)
    h, heads, kv = m.hidden, m.heads, kv_heads_of(m)
    hd, r = h // heads, heads // kv
    need = {"word_embeddings.weight", "final_norm.weight"} | (set() if tied_head else
                                                               {"lm_head.weight"})
    missing = sorted(need - full.keys()) + [f"pool.{j}" for j in range(n_unique)
                                            if f"pool.{j}.qkv.weight" not in full]
    if missing:
        raise ConfigError(f"checkpoint lacks {', '.join(missing)}")
    out = {"model.embed_tokens.weight": full["word_embeddings.weight"],
           "model.norm.weight": full["final_norm.weight"]}
    if not tied_head:
        out["lm_head.weight"] = full["lm_head.weight"]
    for i, j in enumerate(lmap):
        p, q = f"pool.{j}.", f"model.layers.{i}."
        qkv = full[p + "qkv.weight"].view(kv, r + 2, hd, h)
        pairs = {
            "input_layernorm.weight": full[p + "input_norm.weight"],
            "self_attn.q_proj.weight": qkv[:, :r].reshape(heads * hd, h),
            "self_attn.k_proj.weight": qkv[:, r].reshape(kv * hd, h),
            "self_attn.v_proj.weight": qkv[:, r + 1].reshape(kv * hd, h),
            "self_attn.o_proj.weight": full[p + "proj.weight"],
            "post_attention_layernorm.weight": full[p + "mlp_norm.weight"],
            "mlp.gate_proj.weight": full[p + "gate.weight"],
            "mlp.up_proj.weight": full[p + "up.weight"],
            "mlp.down_proj.weight": full[p + "fc2.weight"],
        }
        # .clone(): pool layers shared by several HF layers must become separate tensors
        out.update({q + k: v.contiguous().clone() for k, v in pairs.items()})
    return out


def hf_config(model: dict, tok_ids: dict):
    from transformers import LlamaConfig

    from apollo_ds.config import ffn_width, kv_heads_of, model_config_of
    m = model_config_of(model)
    return LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden, intermediate_size=ffn_width(m),
        num_hidden_layers=m.layers, num_attention_heads=m.heads,
        num_key_value_heads=kv_heads_of(m), head_dim=m.hidden // m.heads, hidden_act="silu",
        max_position_embeddings=m.seq_len, initializer_range=m.init_std,
        rms_norm_eps=m.layernorm_eps, tie_word_embeddings=tied(model),
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)},
        attention_bias=False, mlp_bias=False, attention_dropout=m.dropout,
        bos_token_id=tok_ids.get("bos"), eos_token_id=tok_ids.get("eos"),
        pad_token_id=tok_ids.get("pad"))


# ----------------------------------------------------------------------------- the inverse
def model_of_hf(conf: dict) -> dict:
    """The apollo_ds model settings of a LlamaForCausalLM config.json (train.init_from)."""
    rope = conf.get("rope_parameters") or {}
    return {"arch": "llama", "layers": int(conf["num_hidden_layers"]),
            "hidden": int(conf["hidden_size"]), "heads": int(conf["num_attention_heads"]),
            "kv_heads": int(conf.get("num_key_value_heads") or conf["num_attention_heads"]),
            "ffn_hidden": int(conf["intermediate_size"]),
            "seq_len": int(conf.get("max_position_embeddings", 0)),
            "vocab_size": int(conf["vocab_size"]),
            "rope_theta": float(rope.get("rope_theta", conf.get("rope_theta", 10000.0))),
            "tie_embeddings": bool(conf.get("tie_word_embeddings", False))}


_LAYER = {"input_norm.weight": "input_layernorm.weight", "proj.weight": "self_attn.o_proj.weight",
          "mlp_norm.weight": "post_attention_layernorm.weight", "gate.weight": "mlp.gate_proj.weight",
          "up.weight": "mlp.up_proj.weight", "fc2.weight": "mlp.down_proj.weight"}
_TOP = {"word_embeddings.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}


def from_hf(name: str, layer: int | None, get, model: dict):
    """The inverse of ``hf_state`` for one apollo_ds parameter (see hf_gpt2.from_hf): the
    fused QKV is rebuilt per key/value group from HF's separate projections."""
    if layer is None:
        return get(_TOP[name])
    q = f"model.layers.{layer}."
    if name in _LAYER:
        return get(q + _LAYER[name])
    if name == "qkv.weight":
        h, heads = int(model["hidden"]), int(model["heads"])
        kv = int(model.get("kv_heads") or heads)
        hd, r = h // heads, heads // kv
        parts = [get(q + "self_attn.q_proj.weight").reshape(kv, r, hd, h),
                 get(q + "self_attn.k_proj.weight").reshape(kv, 1, hd, h),
                 get(q + "self_attn.v_proj.weight").reshape(kv, 1, hd, h)]
        import torch
        return torch.cat(parts, dim=1).reshape(kv * (r + 2) * hd, h).contiguous()
    raise KeyError(name)
