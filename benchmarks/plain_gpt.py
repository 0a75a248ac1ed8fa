"""The plain-GPT baseline of the throughput benchmarks: PoolGPT's architecture with its L
layers in an nn.ModuleList run in order (no layer map). Kept apart from the measuring code so
other benchmarks (gpu_check.py) import the same baseline instead of copying it."""
from __future__ import annotations


def make_plain_class():
    """Defined lazily: torch / megatron-core import slowly."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from apollo_ds.model import PoolGPT
    from apollo_ds.model.gpt import Block, lm_loss

    class PlainGPT(nn.Module):
        """PoolGPT's architecture with its L layers in ``self.layers`` run in order: same
        Block class, embeddings, tied vocab-parallel LM head and loss; no layer map. Built by
        borrowing a PoolGPT's submodules' construction (so both stay in step with gpt.py)."""

        def __init__(self, cfg, dtype=torch.float32):
            super().__init__()
            ref = PoolGPT(cfg, cfg.layers, dtype=dtype)
            assert all(isinstance(b, Block) for b in ref.pool)
            self.cfg = cfg
            self.word_embeddings = ref.word_embeddings
            self.position_embeddings = ref.position_embeddings
            self.layers = nn.ModuleList(list(ref.pool))
            self.final_norm = ref.final_norm
            self.lm_head = ref.lm_head
            self.register_buffer("pad_mask", ref.pad_mask.clone(), persistent=False)
            # Known at build time, as in PoolGPT: asking pad_mask.any() each forward would add
            # a host sync per micro-batch on CUDA that the pool model does not pay.
            self.has_pad = ref.has_pad

        def load_from_pool(self, pool_model) -> None:
            sd = {(("layers." + k[len("pool."):]) if k.startswith("pool.") else k): v
                  for k, v in pool_model.state_dict().items()}
            self.load_state_dict(sd, strict=True)

        def forward(self, tokens, labels=None, loss_mask=None):
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            x = self.word_embeddings(tokens) + self.position_embeddings(positions)
            x = F.dropout(x, self.cfg.dropout, self.training)
            for block in self.layers:
                x = block(x)
            x = self.final_norm(x)
            logits, _ = self.lm_head(x, weight=self.word_embeddings.weight)
            pad = self.pad_mask if self.has_pad else None
            if labels is None:
                return logits if pad is None else logits.masked_fill(pad, float("-inf"))
            return lm_loss(logits, labels, loss_mask, pad)   # PoolGPT's loss

    return PlainGPT

