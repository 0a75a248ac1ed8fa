"""KV-cache decoding (apollo_ds.downstream.kv_cache) on PoolGPT models of both architectures:
every step's logits equal the training forward's on the whole context, left-padded batches
equal rows run alone, and cached generation gives the uncached path's ids, across the seq_len
window too; bad sampling options are refused with one line naming the option."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from apollo_ds.config import ConfigError, ModelConfig

SEQ = 24


def _model(arch: str, n_unique: int, layers: int, seed: int):
    from apollo_ds.apollo.layer_maps import layer_map
    from apollo_ds.model import PoolGPT
    from apollo_ds.model.init import init_weights
    cfg = ModelConfig(layers=layers, hidden=64, heads=4, seq_len=SEQ, vocab_size=100,
                      arch=arch, kv_heads=2 if arch == "llama" else 0)
    m = PoolGPT(cfg, n_unique)
    init_weights(m, seed, 0.2, layers, cfg.vocab_size)   # a large std: peaked, varied logits
    return m.eval(), layer_map(n_unique, layers, "interpolate")


@dataclass
class Wrapped:
    """What generate.py needs of a loaded model (models.LoadedModel's fields)."""
    m: object
    lmap: list
    seq_len: int = SEQ
    eod: int = 99

    def logits(self, t):
        with torch.no_grad():
            return self.m(t, self.lmap)[..., :100].float()

    def decoder(self):
        from apollo_ds.downstream.kv_cache import NativeDecoder
        return NativeDecoder(self.m, self.lmap)

    def encode(self, s):
        return [ord(c) % 90 + 1 for c in s]

    def decode(self, ids):
        return ",".join(map(str, ids))


@pytest.fixture(params=[("gpt2", 2, 5), ("llama", 3, 4)], ids=["gpt2-2of5", "llama-3of4"])
def model(request, single_process_group):
    arch, n, layers = request.param
    return Wrapped(*_model(arch, n, layers, seed=11))


def test_each_step_equals_the_full_forward_and_padding_is_invisible(model):
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (7, 3, 5)]
    extra = torch.randint(0, 100, (3, 6), generator=g).tolist()
    dec = model.decoder()
    got = [dec.start(rows)]
    for j in range(6):
        got.append(dec.step([e[j] for e in extra]))
    for i, row in enumerate(rows):
        full = model.logits(torch.tensor([row + extra[i]]))[0]      # one row, no padding
        for j, step_logits in enumerate(got):
            want = full[len(row) - 1 + j]
            assert torch.allclose(step_logits[i], want, atol=2e-5, rtol=1e-5), (i, j)
    # the same row alone (no padding at all) through the cache
    alone = model.decoder().start([rows[1]])
    assert torch.allclose(alone[0], got[0][1], atol=2e-5, rtol=1e-5)


def test_cached_generation_equals_uncached_across_the_window(model):
    from apollo_ds.downstream.generate import generate_batch
    prompts = ["hello there", "a", "seventeen chars!!"]
    # 17 + 12 > SEQ=24: the longest row leaves the cached regime mid-way
    kw = dict(max_new_tokens=12, stop_at_eod=False)
    cached = generate_batch(model, prompts, **kw)
    uncached = generate_batch(model, prompts, use_cache=False, **kw)
    assert [r["ids"] for r in cached] == [r["ids"] for r in uncached]
    assert all(len(r["ids"]) == 12 for r in cached)
    # batched == one prompt at a time
    single = [generate_batch(model, [p], **kw)[0]["ids"] for p in prompts]
    assert single == [r["ids"] for r in cached]
    # sampling: the same draws with and without the cache (prompt i uses seed + i)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.95, seed=3,
              repetition_penalty=1.2, stop_at_eod=False)
    assert generate_batch(model, prompts, **kw) == generate_batch(model, prompts,
                                                                  use_cache=False, **kw)


@pytest.mark.parametrize("kw,message", [
    (dict(temperature=-0.5), "--temperature -0.5: must be a finite number >= 0"),
    (dict(temperature=math.nan), "--temperature nan: must be a finite number >= 0"),
    (dict(top_p=0.0), "--top-p 0.0: must be in (0, 1]"),
    (dict(top_p=1.5), "--top-p 1.5: must be in (0, 1]"),
    (dict(top_p=math.nan), "--top-p nan: must be in (0, 1]"),
    (dict(top_k=-1), "--top-k -1: must be >= 0"),
    (dict(max_new_tokens=-2), "--max-new-tokens -2: must be >= 0"),
    (dict(repetition_penalty=0.0), "--repetition-penalty 0.0: must be > 0"),
])
def test_bad_sampling_options_refused(kw, message):
    from apollo_ds.downstream.generate import check_options
    args = dict(max_new_tokens=4, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    with pytest.raises(ConfigError) as e:
        check_options(**(args | kw))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_decoder_steps_equal_the_full_forward(arch):
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from apollo_ds.downstream.kv_cache import HFDecoder
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=SEQ, n_embd=64,
                                           n_layer=3, n_head=4))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=128,
                                             max_position_embeddings=SEQ))
    model.eval()
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, 100, (n,), generator=g).tolist() for n in (6, 2, 4)]
    extra = torch.randint(0, 100, (3, 5), generator=g).tolist()
    dec = HFDecoder(model, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no deprecated argument names
        got = [dec.start(rows)] + [dec.step([e[j] for e in extra]) for j in range(5)]
    for i, row in enumerate(rows):
        with torch.no_grad():
            full = model(torch.tensor([row + extra[i]])).logits[0]
        for j, step_logits in enumerate(got):
            assert torch.allclose(step_logits[i], full[len(row) - 1 + j], atol=1e-4), (i, j)
