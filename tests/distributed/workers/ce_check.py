"""Run under torchrun with 2 processes (TP2): the chunked vocab-parallel cross entropy
(apollo_ds.model.loss) against megatron-core's on an fp32 copy of the same logits slice, and
against torch's cross entropy on the full (unsharded) logits. Rank 0 writes the largest
differences of the losses and of the logits gradients to --out.

usage: ce_check.py --out RESULT.json"""
import json
import sys

import torch
import torch.distributed as tdist
import torch.nn.functional as F


def main():
    out = sys.argv[sys.argv.index("--out") + 1]
    from megatron.core import parallel_state, tensor_parallel

    from apollo_ds import cpu_compat
    from apollo_ds.model.loss import vocab_parallel_cross_entropy
    cpu_compat.apply()
    tdist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(2, 1)
    rank, tp = tdist.get_rank(), 2
    g = torch.Generator().manual_seed(7)
    vocab, real = 96, 90                       # rows 90..95 are vocabulary padding
    full = torch.randn(3, 10, vocab, generator=g, dtype=torch.float64).float() * 1.5
    labels = torch.randint(0, real, (3, 10), generator=g)
    grad_out = torch.rand(3, 10, generator=g)
    per = vocab // tp
    ids = torch.arange(rank * per, (rank + 1) * per)
    pad = ids >= real

    mine = full[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(mine, labels, pad, chunk_elements=4 * per)  # 8 chunks
    (loss * grad_out).sum().backward()

    ref_in = full[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    ref = tensor_parallel.vocab_parallel_cross_entropy(ref_in.masked_fill(pad, float("-inf")),
                                                       labels)
    (ref * grad_out).sum().backward()

    whole = full.clone().requires_grad_(True)
    masked = whole.masked_fill(torch.arange(vocab) >= real, float("-inf"))
    plain = F.cross_entropy(masked.view(-1, vocab), labels.view(-1), reduction="none").view(3, 10)
    (plain * grad_out).sum().backward()
    plain_grad = whole.grad[..., rank * per:(rank + 1) * per]

    res = {"loss_vs_megatron": (loss - ref).abs().max().item(),
           "grad_vs_megatron": (mine.grad - ref_in.grad).abs().max().item(),
           "loss_vs_torch": (loss - plain).abs().max().item(),
           "grad_vs_torch": (mine.grad - plain_grad).abs().max().item(),
           "pad_grad": mine.grad[..., pad].abs().max().item() if pad.any() else 0.0,
           "loss_mean": loss.mean().item()}
    both = [None, None]
    tdist.all_gather_object(both, res)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(both, f)
    tdist.barrier()
    parallel_state.destroy_model_parallel()
    tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
