"""Activation recompute (train.recompute=full|selective) on the pooled GPT in one process: the
same loss and the same gradients as without it, exactly in fp32 with dropout 0, and with
dropout > 0 too (apollo_ds.model.recompute replays the default generator and megatron-core's
model-parallel RNG tracker, so the recomputed forward draws the forward's masks), for GPT-2 and
Llama (grouped-query attention). Shared pool layers recompute once per use, and each parameter's
gradient hook fires once per backward however often its layer ran (what ZeRO-2/3 need)."""
import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel

from apollo_ds.config import ModelConfig
from apollo_ds.model import PoolGPT, init_weights

CFG = ModelConfig(layers=4, hidden=64, heads=4, seq_len=32, vocab_size=500)
LLAMA = dataclasses.replace(CFG, arch="llama", kv_heads=2)


def loss_and_grads(recompute, dropout: float, lmap, cfg=CFG, hooks=None):
    cfg = dataclasses.replace(cfg, dropout=dropout)
    m = PoolGPT(cfg, 2, recompute=recompute)
    init_weights(m, 3, cfg.init_std, cfg.layers, cfg.vocab_size)
    m.train()
    if hooks is not None:   # name -> number of times autograd accumulated into .grad
        for n, p in m.named_parameters():
            p.register_post_accumulate_grad_hook(
                lambda _p, n=n: hooks.__setitem__(n, hooks.get(n, 0) + 1))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    torch.manual_seed(11)
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    loss = m(tokens, lmap, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_identical_loss_and_gradients(dropout, mode, cfg,
                                                      single_process_group):
    lmap = [0, 0, 1, 1]   # both pool layers used twice
    la, ga = loss_and_grads("none", dropout, lmap, cfg)
    lb, gb = loss_and_grads(mode, dropout, lmap, cfg)
    assert la == lb
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_each_gradient_hook_fires_once_per_backward_with_reused_layers(mode,
                                                                       single_process_group):
    """ZeRO-2/3 reduce a parameter from this hook and refuse a second call; a reentrant
    checkpoint (megatron-core's) fires it once per use of the layer: 3 times here."""
    hooks = {}
    loss_and_grads(mode, 0.1, [0, 0, 0, 1], hooks=hooks)
    assert len(hooks) == 2 * 12 + 4 and set(hooks.values()) == {1}, hooks


def test_a_reentrant_checkpoint_fires_the_hook_per_use(single_process_group):
    """The failure the test above guards against, shown on megatron-core's checkpoint."""
    layer = torch.nn.Linear(4, 4)
    calls = []
    layer.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    x = torch.randn(2, 4, requires_grad=True)
    y = tensor_parallel.checkpoint(layer, False, tensor_parallel.checkpoint(layer, False, x))
    y.sum().backward()
    assert len(calls) == 2


def test_dropout_is_active_in_the_comparison(single_process_group):
    """Guard against a vacuous pass: dropout 0.1 changes the loss."""
    assert loss_and_grads("none", 0.0, [0, 1])[0] != loss_and_grads("none", 0.1, [0, 1])[0]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_without_the_tracker_replay_the_recomputed_masks_differ(mode, monkeypatch,
                                                                single_process_group):
    """torch's checkpoint alone replays only the default generator: the attention dropout
    (megatron-core's model-parallel stream) would draw new masks in the recomputation."""
    from torch.utils.checkpoint import noop_context_fn
    from apollo_ds.model import recompute
    la, ga = loss_and_grads("none", 0.1, [0, 0, 1, 1])
    monkeypatch.setattr(recompute, "_tracker_contexts", noop_context_fn)
    lb, gb = loss_and_grads(mode, 0.1, [0, 0, 1, 1])
    assert la == lb   # the forward is the same; only the recomputed one is not
    assert not torch.equal(ga["pool.0.qkv.weight"], gb["pool.0.qkv.weight"])


def saved_bytes(recompute, dropout: float) -> int:
    """Bytes autograd keeps for backward after one training forward (s=64)."""
    cfg = dataclasses.replace(CFG, seq_len=64, dropout=dropout)
    m = PoolGPT(cfg, 2, recompute=recompute)
    init_weights(m, 3, cfg.init_std, cfg.layers, cfg.vocab_size)
    m.train()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len),
                           generator=torch.Generator().manual_seed(1))
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if not isinstance(t, torch.nn.Parameter) and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(tokens, [0, 0, 1, 1], tokens)
    return total


def test_selective_keeps_less_than_none_and_full_least(single_process_group):
    """What each mode keeps from the forward (a checkpoint keeps its region's tensors out of
    reach of these outer hooks). With attention dropout SDPA takes its math path, which keeps
    the b*h*s*s probabilities and dropout mask of every layer use: selective drops those
    (measured 4.31 -> 2.73 MB here), full everything inside the layers (0.50 MB)."""
    none, sel, full = (saved_bytes(m, 0.1) for m in ("none", "selective", "full"))
    assert full < 0.7 * sel and sel < 0.7 * none, (none, sel, full)


def test_selective_inside_a_compiled_block(single_process_group):
    """train.compile compiles each block's forward; selective's checkpoint sits inside it and
    must run eagerly at a graph break: traced, its RNG-tracker snapshot fails on fake tensors
    (dropout 0; with dropout the tracker's fork breaks the graph before it anyway). Same loss
    and gradients as the compiled block without recompute."""
    cfg = CFG
    compiled = torch.compile(lambda layer, x: type(layer).forward(layer, x), dynamic=False)

    def run(mode):
        m = PoolGPT(cfg, 2, recompute=mode)
        init_weights(m, 3, cfg.init_std, cfg.layers, cfg.vocab_size)
        m.train()
        for layer in m.pool:
            layer.forward = lambda x, layer=layer: compiled(layer, x)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len),
                               generator=torch.Generator().manual_seed(1))
        torch.manual_seed(11)
        tensor_parallel.model_parallel_cuda_manual_seed(11)
        loss = m(tokens, [0, 0, 1, 1], tokens)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in m.named_parameters()}

    la, ga = run("none")
    lb, gb = run("selective")
    assert la == lb
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=0, msg=n)
