"""fp32 sums for a pool layer's uses in bf16 (apollo_ds.model.shared_grads): one unique layer
run at 12 positions. The bf16 pool gradient is compared with an fp32 reference (the same
bf16-representable weights, fp32 compute) with the fp32 sum and with autograd's bf16 sum (the
behaviour before); the parameter's own gradient hook, where DeepSpeed reduces, still fires once
per parameter per backward, and full recompute gives the same gradients."""
from __future__ import annotations

import torch

from apollo_ds.config import ModelConfig
from apollo_ds.model import shared_grads


def _models():
    from apollo_ds.model import PoolGPT, init_weights
    cfg = ModelConfig(layers=12, hidden=64, heads=4, seq_len=32, vocab_size=512)
    ref, bf = PoolGPT(cfg, 1), PoolGPT(cfg, 1)
    init_weights(ref, 1234, 0.02, cfg.layers, cfg.vocab_size)
    with torch.no_grad():       # weights every dtype holds exactly
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    bf.load_state_dict(ref.state_dict())
    return cfg, ref, bf.to(torch.bfloat16)


def _pool_grads(model, tokens, recompute="none"):
    model.zero_grad(set_to_none=True)
    model.recompute = recompute
    model.train()
    loss = model(tokens, [0] * 12, tokens, None)
    loss.backward()
    return torch.cat([p.grad.float().flatten() for p in model.pool.parameters()])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp32_sum_is_closer_to_fp32(single_process_group, monkeypatch):
    cfg, ref, bf = _models()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len),
                           generator=torch.Generator().manual_seed(3))
    g_ref = _pool_grads(ref, tokens)

    calls = {}
    for name, p in bf.pool.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    g_new = _pool_grads(bf, tokens)
    assert set(calls.values()) == {1} and len(calls) == len(list(bf.pool.parameters()))
    g_full = _pool_grads(bf, tokens, "full")
    assert torch.equal(g_new, g_full)              # recompute: the same fp32-summed gradient

    monkeypatch.setattr("apollo_ds.model.gpt.use_sums", lambda layers, lmap: {})
    g_old = _pool_grads(bf, tokens)                 # autograd's bf16 sum of the 12 uses
    g_sum = _exact_sum_of_uses(bf, tokens)          # the 12 bf16 per-use gradients, fp64 sum
    vs_fp32 = _rel(g_old, g_ref) / _rel(g_new, g_ref)
    vs_sum = _rel(g_old, g_sum) / _rel(g_new, g_sum)
    print(f"bf16 pool gradient, relative error: vs the fp32 model {_rel(g_old, g_ref):.3e} -> "
          f"{_rel(g_new, g_ref):.3e} ({vs_fp32:.2f}x closer); vs the exact sum of its 12 uses "
          f"{_rel(g_old, g_sum):.3e} -> {_rel(g_new, g_sum):.3e} ({vs_sum:.1f}x closer)")
    assert vs_fp32 > 1.0          # bf16 compute of each use dominates what is left
    assert vs_sum > 1.3           # the summation itself
    # one rounding of the exact sum to bf16 (half an ulp: 2^-8 relative), every element;
    # autograd's 11 successive bf16 additions break that bound
    bound = 2.0 ** -8 * g_sum.abs() + 1e-30
    assert ((g_new - g_sum).abs() <= bound).all()
    assert ((g_old - g_sum).abs() > bound).sum() > 100


def _exact_sum_of_uses(model, tokens):
    """Each use's bf16 gradient on its own alias (torch.func.functional_call in a plain loop,
    independent of shared_grads), summed in float64."""
    layer = model.pool[0]
    names = [n for n, _ in layer.named_parameters()]
    aliases = [{n: p.view_as(p) for n, p in layer.named_parameters()} for _ in range(12)]
    x = model.word_embeddings(tokens) + model.position_embeddings(
        torch.arange(tokens.shape[1]))
    for use in aliases:
        x = torch.func.functional_call(layer, use, (x,))
    x = model.final_norm(x)
    logits, _ = model.lm_head(x, weight=model.word_embeddings.weight)
    from apollo_ds.model.gpt import lm_loss
    loss = lm_loss(logits, tokens, None)
    grads = torch.autograd.grad(loss, [use[n] for use in aliases for n in names])
    k = len(names)
    return torch.cat([sum(grads[u * k + j].double() for u in range(12)).flatten()
                      for j in range(k)]).float()


def test_only_repeated_bf16_layers(single_process_group):
    cfg, ref, bf = _models()
    assert shared_grads.use_sums(ref.pool, [0] * 12) == {}            # fp32: nothing to do
    assert shared_grads.use_sums(bf.pool, [0]) == {}                  # used once
    assert list(shared_grads.use_sums(bf.pool, [0] * 12)) == [0]
    with torch.no_grad():
        assert shared_grads.use_sums(bf.pool, [0] * 12) == {}        # evaluation


def test_nested_variant_equals_aliases(single_process_group, monkeypatch):
    """ZeRO-3's variant (an inner graph per use; the last use's real backward hands each
    parameter the sum) on whole parameters: the same gradients, bit for bit, as the alias
    variant, with every recompute mode, and the parameter hook still fires once."""
    cfg, _, bf = _models()
    tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len),
                           generator=torch.Generator().manual_seed(3))
    g_alias = _pool_grads(bf, tokens)
    monkeypatch.setattr(shared_grads, "_partitioned", lambda p: True)
    assert isinstance(shared_grads.use_sums(bf.pool, [0] * 12)[0], shared_grads.NestedUseSum)
    calls = {}
    for name, p in bf.pool.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    g_nested = _pool_grads(bf, tokens)
    assert set(calls.values()) == {1} and len(calls) == len(list(bf.pool.parameters()))
    assert torch.equal(g_nested, g_alias)
    for mode in ("selective", "full"):
        for layer in bf.pool:
            layer.recompute_core = mode == "selective"
        assert torch.equal(_pool_grads(bf, tokens, mode), g_alias), mode
    # the embedding (outside the pool) gets the same gradient through the nested uses
    monkeypatch.undo()
    for layer in bf.pool:
        layer.recompute_core = False
    _pool_grads(bf, tokens)
    g_emb = bf.word_embeddings.weight.grad.clone()
    monkeypatch.setattr(shared_grads, "_partitioned", lambda p: True)
    _pool_grads(bf, tokens)
    assert torch.equal(bf.word_embeddings.weight.grad, g_emb)
