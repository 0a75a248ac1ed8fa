"""FLOPs accounting against hand-computed numbers."""
import pytest

from apollo_ds.config import ModelConfig
from apollo_ds.flops import (forward_flops_per_token, layer_forward_flops_per_token,
                             padded_vocab, train_flops)


def test_padded_vocab():
    assert padded_vocab(50257, 128) == 50304
    assert padded_vocab(50257, 128, tp=2) == 50432
    assert padded_vocab(2048, 128) == 2048
    assert padded_vocab(2049, 128) == 2176
    assert padded_vocab(100, 1) == 100
    with pytest.raises(ValueError):
        padded_vocab(100, 0)


def test_small_hand_computed_case():
    # h=64, s=32, V=100, ffn 4: per layer 2*(3+1+8)*64^2 = 98304 matmul + 2*2*32*64 = 8192
    assert layer_forward_flops_per_token(64, 32) == 106_496
    # depth 2: 2*106496 + LM head 2*64*100 = 12800
    assert forward_flops_per_token(64, 32, 100, 2) == 225_792
    assert forward_flops_per_token(64, 32, 100, 0) == 12_800
    # ffn_mult=2: 2*(3+1+4)*4096 + 8192
    assert forward_flops_per_token(64, 32, 100, 1, ffn_mult=2) == 65_536 + 8_192 + 12_800


def test_gpt2_base():
    # 12 x (24*768^2 + 4*1024*768) + 2*768*50304 (50257 padded to 128)
    assert forward_flops_per_token(768, 1024, 50304, 12) == 284_884_992
    m = ModelConfig(layers=12, hidden=768, heads=12, seq_len=1024, vocab_size=50257,
                    pad_vocab_to=128)
    assert train_flops(m, 12, 1000) == pytest.approx(3 * 284_884_992 * 1000)


def test_relative_flops_of_depth():
    m = ModelConfig(layers=12, hidden=64, seq_len=32, vocab_size=100, pad_vocab_to=1)
    full = train_flops(m, 12, 1)
    layer, head = 106_496, 12_800
    for d in range(0, 13):
        assert train_flops(m, d, 1) / full == pytest.approx((d * layer + head) /
                                                            (12 * layer + head))
    assert train_flops(m, 6, 1) / full < 0.55          # head is small here
    # affine in depth: a fractional (expected) depth interpolates
    assert train_flops(m, 4.5, 7) == pytest.approx((train_flops(m, 4, 7) +
                                                    train_flops(m, 5, 7)) / 2)
    # padding to 128 raises the head cost
    m.pad_vocab_to = 128
    assert train_flops(m, 0, 1) == 3 * 2 * 64 * 128


def test_llama_gqa_swiglu_hand_computed():
    # h=64, 4 heads of 16, 2 kv heads (K, V 32 wide each), SwiGLU width 192, s=32, V 300 -> 384:
    # weights per layer 64*(64+2*32) + 64*64 + 3*192*64 = 49152; x2 + attention 2*2*32*64
    m = ModelConfig(arch="llama", layers=4, hidden=64, heads=4, kv_heads=2, seq_len=32,
                    vocab_size=300)
    per_layer = 2 * 49_152 + 8_192
    assert train_flops(m, 4, 1) == 3 * (4 * per_layer + 2 * 64 * 384)
    # without GQA (kv_heads = heads) K and V are 64 wide: 2*64*64 more weights per layer
    m.kv_heads = 0
    assert train_flops(m, 1, 1) - 3 * (per_layer + 2 * 64 * 384) == 3 * 2 * (2 * 64 * 32)
