"""The chunked vocab-parallel cross entropy (apollo_ds.model.loss) equals megatron-core's
vocab_parallel_cross_entropy on an fp32 copy of the logits (the loss apollo_ds used before) and
torch's cross entropy, losses and logits gradients within 1e-6 in fp32, at TP1 in process and
at TP2 over two gloo processes; padded vocabulary rows get no probability and no gradient."""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from tests.conftest import torchrun


def _case(seed=0, vocab=80, real=77, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, 9, vocab, generator=g) * 1.5).to(dtype)
    labels = torch.randint(0, real, (4, 9), generator=g)
    grad_out = torch.rand(4, 9, generator=g)
    return logits, labels, grad_out, torch.arange(vocab) >= real


def _grads(fn, logits, labels, grad_out):
    x = logits.clone().requires_grad_(True)
    loss = fn(x, labels)
    (loss * grad_out).sum().backward()
    return loss.detach(), x.grad


def test_tp1_equals_megatron_and_torch(single_process_group):
    from megatron.core import tensor_parallel

    from apollo_ds.model.loss import vocab_parallel_cross_entropy
    logits, labels, grad_out, pad = _case()
    for chunk in (80, 5 * 80, 1 << 26):       # one token per chunk, 5 tokens, everything
        ours, g_ours = _grads(lambda x, y: vocab_parallel_cross_entropy(x, y, pad, chunk),
                              logits, labels, grad_out)
        meg, g_meg = _grads(lambda x, y: tensor_parallel.vocab_parallel_cross_entropy(
            x.masked_fill(pad, float("-inf")).float(), y), logits, labels, grad_out)
        plain, g_plain = _grads(lambda x, y: F.cross_entropy(
            x.masked_fill(pad, float("-inf")).transpose(1, 2), y, reduction="none"),
            logits, labels, grad_out)
        assert ours.dtype == torch.float32 and ours.shape == labels.shape
        assert (ours - meg).abs().max() < 1e-6 and (ours - plain).abs().max() < 1e-6
        assert (g_ours - g_meg).abs().max() < 1e-6 and (g_ours - g_plain).abs().max() < 1e-6
        assert g_ours[..., pad].abs().max() == 0.0
    # random logits of std 1.5 over 77 rows: about ln 77 + 1.5**2 / 2 = 5.5
    assert 4.5 < ours.mean().item() < 6.5


def test_bf16_logits_keep_their_dtype(single_process_group):
    """bf16 logits: the gradient comes back in bf16, equal to the old path (fp32 copy, fp32
    cross entropy, gradient cast to bf16) up to one bf16 rounding."""
    from megatron.core import tensor_parallel

    from apollo_ds.model.loss import vocab_parallel_cross_entropy
    logits, labels, grad_out, pad = _case(seed=1, dtype=torch.bfloat16)
    ours, g_ours = _grads(lambda x, y: vocab_parallel_cross_entropy(x, y, pad, 7 * 80),
                          logits, labels, grad_out)
    old, g_old = _grads(lambda x, y: tensor_parallel.vocab_parallel_cross_entropy(
        x.masked_fill(pad, float("-inf")).float(), y), logits, labels, grad_out)
    assert g_ours.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert (ours - old).abs().max() < 1e-5
    assert ((g_ours.float() - g_old.float()).abs() <= 2 ** -8 * g_old.float().abs() + 1e-9).all()


def test_tp2_equals_megatron_and_torch(tmp_path):
    out = tmp_path / "ce.json"
    torchrun(2, "tests/distributed/workers/ce_check.py", ["--out", str(out)], timeout=300)
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    for r in ranks:
        for key in ("loss_vs_megatron", "grad_vs_megatron", "loss_vs_torch", "grad_vs_torch"):
            assert r[key] < 1e-6, (key, r)
        assert r["pad_grad"] == 0.0
    assert ranks[0]["loss_mean"] == ranks[1]["loss_mean"]   # the full-vocabulary loss on both
