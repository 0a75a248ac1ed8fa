"""Activation recompute (train.recompute=full) on the pooled GPT in one process: the same loss
and the same gradients as without it, exactly in fp32 with dropout 0, and with dropout > 0
too (megatron-core's checkpoint restores the default and the model-parallel RNG streams, so
the recomputed forward draws the forward's masks). Shared pool layers recompute once per use."""
import dataclasses

import pytest
import torch
from megatron.core import tensor_parallel

from apollo_ds.config import ModelConfig
from apollo_ds.model import PoolGPT, init_weights

CFG = ModelConfig(layers=4, hidden=64, heads=4, seq_len=32, vocab_size=500)


def loss_and_grads(recompute: bool, dropout: float, lmap):
    cfg = dataclasses.replace(CFG, dropout=dropout)
    m = PoolGPT(cfg, 2, recompute=recompute)
    init_weights(m, 3, cfg.init_std, cfg.layers, cfg.vocab_size)
    m.train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len), generator=g)
    torch.manual_seed(11)
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    loss = m(tokens, lmap, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_recompute_gives_identical_loss_and_gradients(dropout, single_process_group):
    lmap = [0, 0, 1, 1]   # both pool layers used twice
    la, ga = loss_and_grads(False, dropout, lmap)
    lb, gb = loss_and_grads(True, dropout, lmap)
    assert la == lb
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=0, atol=0, msg=n)


def test_dropout_is_active_in_the_comparison(single_process_group):
    """Guard against a vacuous pass: dropout 0.1 changes the loss."""
    assert loss_and_grads(False, 0.0, [0, 1])[0] != loss_and_grads(False, 0.1, [0, 1])[0]
