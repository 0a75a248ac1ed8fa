"""A Hugging Face export read back as apollo_ds parameters (train.init_from): the exporter's
per-architecture mappers run backwards (``hf_gpt2.from_hf``, ``hf_llama.from_hf``), one
tensor at a time from the safetensors files, so nothing but the tensor asked for is loaded."""
from __future__ import annotations

import json
import os

from apollo_ds.config import ConfigError
from apollo_ds.convert import hf_gpt2, hf_llama

MAPPERS = {hf_gpt2.ARCH: hf_gpt2, hf_llama.ARCH: hf_llama}
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def weight_files(path: str) -> list[str]:
    single, index = (os.path.join(path, n) for n in WEIGHTS)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    raise ConfigError(f"no {WEIGHTS[0]} (safetensors weights) in {path}; export with "
                      f"apollo_ds.convert.to_hf or save_pretrained(safe_serialization=True)")


def open_export(path: str):
    """(apollo_ds model settings, layers, a description, read(canonical name) -> full fp32
    tensor with vocabulary rows unpadded; ``pool.<j>.`` reads HF layer j)."""
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    arch = (conf.get("architectures") or [""])[0]
    if arch not in MAPPERS:
        raise ConfigError(f"a Hugging Face {arch or 'model'} cannot be read; give a "
                          f"{' or '.join(MAPPERS)} export (apollo_ds.convert.to_hf) or a run "
                          f"directory")
    mapper = MAPPERS[arch]
    model = mapper.model_of_hf(conf)
    from safetensors import safe_open
    where = {}
    for fn in weight_files(path):
        with safe_open(fn, framework="pt") as f:
            where.update({k: fn for k in f.keys()})

    def get(key: str):
        if key == "lm_head.weight" and key not in where:   # a tied export
            key = "model.embed_tokens.weight"
        if key not in where:
            raise ConfigError(f"the export {path} lacks {key}: not a complete {arch}")
        with safe_open(where[key], framework="pt") as f:
            return f.get_tensor(key)

    def read(name: str):
        layer = None
        if name.startswith("pool."):
            _, j, name = name.split(".", 2)
            layer = int(j)
        return mapper.from_hf(name, layer, get, model).float()
    return model, int(model["layers"]), f"Hugging Face {arch}", read
