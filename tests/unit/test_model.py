"""The pooled GPT: a layer map [0..L-1] is exactly the plain stack; shared layers are reused
by reference; padding never reaches the loss; a tiny model learns real text."""
import math

import torch

from apollo_ds.config import ModelConfig
from apollo_ds.model import PoolGPT, init_weights, padded_vocab_size

CFG = ModelConfig(layers=4, hidden=64, heads=4, seq_len=32, vocab_size=500)


def make(n_unique=4, seed=7):
    m = PoolGPT(CFG, n_unique)
    init_weights(m, seed, CFG.init_std, CFG.layers, CFG.vocab_size)
    return m


def plain_stack_logits(m, tokens):
    """The same layers run as an ordinary sequential GPT, without the layer-map machinery."""
    pos = torch.arange(tokens.shape[1])
    x = m.word_embeddings(tokens) + m.position_embeddings(pos)
    for block in torch.nn.Sequential(*m.pool):
        x = block(x)
    x = m.final_norm(x)
    return x @ m.word_embeddings.weight.t()


def test_pool_map_equals_plain_stack(single_process_group):
    m = make()
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(0))
    pooled = m(tokens, [0, 1, 2, 3])
    plain = plain_stack_logits(m, tokens)
    real = slice(0, CFG.vocab_size)
    torch.testing.assert_close(pooled[..., real], plain[..., real], rtol=0, atol=0)
    assert torch.isinf(pooled[..., CFG.vocab_size:]).all()  # padded rows masked out


def test_shared_layer_reuse_and_gradients_sum(single_process_group):
    m = make(n_unique=1)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len), generator=torch.Generator().manual_seed(1))
    loss = m(tokens, [0, 0, 0], labels=tokens.roll(-1, 1))
    loss.backward()
    # a depth-3 map over one unique layer is the same module three times
    assert len(list(m.parameters())) == len(list(make(n_unique=1).parameters()))
    assert m.pool[0].qkv.weight.grad.abs().sum() > 0


def test_padding_and_init_independent_of_padding(single_process_group):
    assert padded_vocab_size(500, 128, 1) == 512 and padded_vocab_size(500, 128, 2) == 512
    assert padded_vocab_size(513, 128, 2) == 768
    a, b = make(seed=3), make(seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    assert a.word_embeddings.weight[CFG.vocab_size:].abs().sum() == 0


def test_initial_loss_near_uniform(single_process_group):
    m = make()
    tokens = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len), generator=torch.Generator().manual_seed(3))
    loss = m(tokens, [0, 1, 2, 3], labels=labels)
    assert abs(loss.item() - math.log(CFG.vocab_size)) < 0.2


def test_loss_falls_on_real_text(single_process_group, corpus):
    from apollo_ds.config import RunConfig
    from apollo_ds.data import build_datasets, get_micro_batch
    cfg = RunConfig()
    cfg.model = ModelConfig(layers=2, hidden=64, heads=4, seq_len=32, vocab_size=corpus.vocab)
    cfg.data.prefix, cfg.data.tokenizer = corpus.prefix, corpus.tokenizer
    cfg.train.out_dir = str(corpus.prefix) + "_run"
    train_ds, _ = build_datasets(cfg, 30 * 8, 8)
    torch.manual_seed(0)
    m = PoolGPT(cfg.model, 2)
    init_weights(m, 0, 0.02, 2, corpus.vocab)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        b = get_micro_batch(train_ds, step * 8, 8)
        loss = m(b["tokens"], [0, 1], b["labels"], b["loss_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > math.log(corpus.vocab) - 0.5
    assert last < first - 0.6, (first, last)
