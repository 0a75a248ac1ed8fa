"""Run under torchrun: train to a stage boundary, expand, and record what the test asserts:
losses on fixed batches at several depths before/after, the gathered fp32 masters and Adam
moments of every parameter before/after (and which old layer's moments each new layer holds),
every optimizer group's Adam step count after the expansion, the next step's loss on every
rank, and how far the next step's update of the fresh-Adam layers is from a fresh AdamW's.
Each case (a config) builds its own Trainer in this process, one after another, so a matrix
of cases costs one launch.

usage: expansion_check.py --cases CASES.json --out RESULT.json
  CASES.json: [{"name": ..., "config": CFG.yaml}, ...]; RESULT.json: name -> record"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish  # noqa: E402

from apollo_ds import distributed  # noqa: E402
from apollo_ds.apollo import layer_map  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.apollo.expand import pool_index, source_name  # noqa: E402
from apollo_ds.apollo.layer_maps import expansion_sources  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402
from apollo_ds.training.state import group_step_counts  # noqa: E402


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


def check(cfg, dist) -> dict:
    tr = Trainer(cfg, dist)
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
    moment_source, moment_ratio = {}, {}
    for i in range(n_new):
        names = [n for n in state_after if pool_index(n) == i]
        if all(state_after[n]["exp_avg_sq"].abs().max().item() == 0 for n in names):
            moment_source[i] = None
        else:
            match = [j for j in range(n_old) if all(torch.equal(
                state_after[n]["exp_avg_sq"], state_before[f"pool.{j}.{n.split('.', 2)[2]}"]
                ["exp_avg_sq"]) for n in names)]
            moment_source[i] = match[0] if match else -1
        src = [source_name(n, sources) for n in names]
        moment_ratio[i] = [sum(state_before[s_][k].norm().item() for s_ in src)
                           / max(sum(state_after[n][k].norm().item() for n in names), 1e-30)
                           for k in ("exp_avg", "exp_avg_sq")]
    steps_after = group_step_counts(tr.engine)
    rec = tr.train_step(boundary + 1)
    state_next, _ = tr.runtime.full_state()
    # AdamW's first update from zero moments (step 1): p1 = p0 (1 - lr wd) - lr m1/(1-b1) /
    # (sqrt(v1/(1-b2)) + eps), where m1 = (1-b1) g and v1 = (1-b2) g^2.
    t = cfg.train
    fresh_err, zero_start_err = {}, {}
    for i in range(n_new):
        errs, zs = [], []
        for n in (n for n in state_after if pool_index(n) == i):
            # in float64, so the only rounding is the optimizer's own fp32 arithmetic
            p0, p1 = state_after[n]["param"].double(), state_next[n]["param"].double()
            m1, v1 = state_next[n]["exp_avg"].double(), state_next[n]["exp_avg_sq"].double()
            wd = t.weight_decay if p0.dim() >= 2 else 0.0
            lr = rec["lr"]
            expect = p0 * (1 - lr * wd) - lr * (m1 / (1 - t.beta1)) / (
                (v1 / (1 - t.beta2)).sqrt() + 1e-8)
            # what fp32 can hold: a few units in the last place of the parameter (an update
            # far smaller than p rounds to p's ulp, whatever the kernel's order of operations)
            # plus a relative 1e-5 of the update itself. A wrong update (no bias correction,
            # moments not restarted) is off by a large fraction of p1 - p0, and a missing
            # weight decay by p0 lr wd (about 1e-3 of the update here: what the old relative
            # 1e-3 bound let pass at ZeRO-3, where partitioned parameters lost their decay).
            ulp = torch.finfo(torch.float32).eps
            tol = 2 * ulp * p0.abs() + 1e-5 * (p1 - p0).abs().max().clamp_min(1e-30)
            errs.append(((p1 - expect).abs() / tol).max().item())
            zs.append(((m1 * m1 * (1 - t.beta2) - v1 * (1 - t.beta1) ** 2).abs().max()
                       / v1.abs().max().clamp_min(1e-30)).item())
        fresh_err[i], zero_start_err[i] = max(errs), max(zs)
    local = torch.tensor([rec["loss"]], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.world)]
    torch.distributed.all_gather(gathered, local)
    tr.close()
    return {"n_old": n_old, "n_new": n_new, "sources": sources,
            "losses_before": before, "losses_after": after,
            "max_diff": worst, "step_before": step_before, "step_after": step_after,
            "moment_source": moment_source, "moment_ratio": moment_ratio,
            "group_steps_after": steps_after, "fresh_update_err": fresh_err,
            "zero_start_err": zero_start_err,
            "n_params_after": len(state_after), "nonzero_moments": nonzero_moments,
            "next_loss_per_rank": [g.item() for g in gathered]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases")
    p.add_argument("--out")
    a = p.parse_args()
    with open(a.cases) as f:
        cases = json.load(f)
    cfgs = [validate(load_config(c["config"], [])) for c in cases]
    dist = distributed.init(cfgs[0].parallel.tp, cfgs[0].parallel.pp)
    result = {}
    for case, cfg in zip(cases, cfgs):
        result[case["name"]] = check(validate(cfg, world_size=dist.world), dist)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
