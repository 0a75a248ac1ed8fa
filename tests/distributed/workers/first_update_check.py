"""Run under torchrun: one optimizer step from the initial weights, then, for every parameter,
how far its update is from a fresh AdamW's first update at lr = scale x the schedule's lr, for
scale 1 and 1/4: p1 = p0 (1 - lr wd) - lr m1/(1-b1) / (sqrt(v1/(1-b2)) + eps), with m1, v1 the
moments after the step. Writes {name: {scale: relative error}} (rank 0).

usage: first_update_check.py --config CFG --out RESULT.json [overrides]"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

SCALES = (1.0, 0.25)


def main():
    a, cfg, dist, tr = start()
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
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump({"lr": rec["lr"], "errors": out}, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
