"""Run under torchrun: one optimizer step from the initial weights, then, for every parameter,
how far its update is from a fresh AdamW's first update at lr = scale x the schedule's lr, for
scale 1 and 1/4: p1 = p0 (1 - lr wd) - lr m1/(1-b1) / (sqrt(v1/(1-b2)) + eps), with m1, v1 the
moments after the step. Each case (a config) builds its own Trainer in this process, one after
another. Writes {case: {"lr": lr, "errors": {name: {scale: relative error}}}} (rank 0).

usage: first_update_check.py --cases CASES.json --out RESULT.json
  CASES.json: [{"name": ..., "config": CFG.yaml}, ...]"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from apollo_ds import distributed  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402

SCALES = (1.0, 0.25)


def check(cfg, dist) -> dict:
    tr = Trainer(cfg, dist)
    # no Adam state exists before the first step: read the fp32 masters only
    before = {n: {"param": safe_get_full_fp32_param(p).detach().float().cpu().clone()}
              for n, p in tr.runtime.named_parameters()}
    rec = tr.train_step(1)
    after, _ = tr.runtime.full_state()
    t = cfg.train
    out = {}
    for name, st in after.items():
        p0, p1 = before[name]["param"], st["param"]
        m1, v1 = st["exp_avg"], st["exp_avg_sq"]
        wd = t.weight_decay if p0.dim() >= 2 else 0.0
        direction = (m1 / (1 - t.beta1)) / ((v1 / (1 - t.beta2)).sqrt() + 1e-8)
        moved = (p1 - p0).abs().max().clamp_min(1e-30)
        out[name] = {str(s): ((p1 - (p0 * (1 - s * rec["lr"] * wd) - s * rec["lr"] * direction))
                              .abs().max() / moved).item() for s in SCALES}
    tr.close()
    return {"lr": rec["lr"], "errors": out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases")
    p.add_argument("--out")
    a = p.parse_args()
    with open(a.cases) as f:
        cases = json.load(f)
    cfgs = [validate(load_config(c["config"], [])) for c in cases]
    dist = distributed.init(cfgs[0].parallel.tp, cfgs[0].parallel.pp)
    result = {c["name"]: check(validate(cfg, world_size=dist.world), dist)
              for c, cfg in zip(cases, cfgs)}
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(result, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
