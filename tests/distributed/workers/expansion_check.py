"""Run under torchrun: train to a stage boundary, expand, and record what the test asserts:
losses on fixed batches at several depths before/after, the gathered fp32 masters and Adam
moments of every parameter before/after, and the next step's loss on every rank.

usage: expansion_check.py --config CFG --out RESULT.json [overrides]"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402

from apollo_ds.apollo import layer_map  # noqa: E402
from apollo_ds.apollo.expand import source_name  # noqa: E402
from apollo_ds.apollo.layer_maps import expansion_sources  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402


@torch.no_grad()
def fixed_losses(tr: Trainer, depths):
    tr.engine.eval()
    out = {}
    for d in depths:
        losses = []
        for j in range(2):
            b = tr.runtime.batch(tr.valid_ds, j * tr.cfg.train.micro_batch)
            lmap = layer_map(tr.model.n_unique, d, tr.cfg.apollo.grow)
            losses.append(tr.engine(b["tokens"], lmap, b["labels"], b["loss_mask"]).item())
        out[d] = losses
    tr.engine.train()
    return out


def main():
    a, cfg, dist, tr = start()
    boundary = tr.schedule.end_step(0)
    for s in range(1, boundary + 1):
        tr.train_step(s)
        tr.step = s
    n_old, n_new = tr.model.n_unique, tr.schedule.unique_at(boundary + 1)
    depths = list(range(n_new, cfg.model.layers + 1))
    before = fixed_losses(tr, depths)
    state_before, step_before = tr.runtime.full_state()
    tr.expand(n_new)
    after = fixed_losses(tr, depths)
    state_after, step_after = tr.runtime.full_state()
    sources = expansion_sources(n_old, n_new, cfg.apollo.grow)
    worst = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    nonzero_moments = 0
    for name, st in state_after.items():
        src = state_before[source_name(name, sources)]
        for key in worst:
            worst[key] = max(worst[key], (st[key] - src[key]).abs().max().item())
        nonzero_moments += int(st["exp_avg_sq"].abs().sum().item() > 0)
    rec = tr.train_step(boundary + 1)
    local = torch.tensor([rec["loss"]], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, local)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump({"n_old": n_old, "n_new": n_new, "sources": sources,
                       "losses_before": before, "losses_after": after,
                       "max_diff": worst, "step_before": step_before, "step_after": step_after,
                       "n_params_after": len(state_after), "nonzero_moments": nonzero_moments,
                       "next_loss_per_rank": [g.item() for g in gathered]}, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
