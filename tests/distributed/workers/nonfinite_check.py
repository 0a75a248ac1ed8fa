"""Run under torchrun with APOLLO_DS_FAULT set and train.on_nonfinite=skip: for each DeepSpeed
config given (one engine after the other in the same process groups), train.steps steps
through Trainer.train_step; after each, the full fp32 state (masters and Adam moments) and the
engine's optimizer step count. Writes per config and step (rank 0): whether the record says
skipped, its loss, the pre-step gradient norm it reports, the norm DeepSpeed's own optimizer
step computed (get_global_grad_norm; at fp32 ZeRO 0 and PP1, where DeepSpeed computes none,
the 2-norm of the module's gradients read right before the step; None at ZeRO 0 and PP2), how
much the state changed in that
step (max abs difference over every tensor and rank) and the optimizer step count.

usage: nonfinite_check.py --config CFG --out RESULT.json --ds A.json,B.json [overrides]"""
import argparse
import dataclasses
import json
import os
import sys

import torch

from apollo_ds.lazy_compile import import_heavy

import_heavy()   # as pretrain.py does: no TorchInductor at start-up
from apollo_ds import distributed  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.distributed import all_reduce  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402
from apollo_ds.training.state import optimizer_step_count  # noqa: E402


def max_change(a: dict, b: dict) -> float:
    worst = 0.0
    for name, st in a.items():
        for key, v in st.items():
            if v is not None:
                worst = max(worst, (v - b[name][key]).abs().max().item())
    return all_reduce([worst], op="max").tolist()[0]


def run(cfg, dist) -> list[dict]:
    tr = Trainer(cfg, dist)
    before, steps = None, []   # (no Adam state exists before the first step)
    zero0, seen = tr.zero == 0, []
    if zero0 and dist.pp == 1:
        take = tr.engine._take_model_step

        def take_and_record(lr_kwargs=None):
            grads = [p.grad.float() for p in tr.engine.module.parameters() if p.grad is not None]
            seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            return take(lr_kwargs)
        tr.engine._take_model_step = take_and_record
    for s in range(1, cfg.train.steps + 1):
        rec = tr.train_step(s)
        after, _ = tr.runtime.full_state()
        ds_norm = (seen[-1] if seen else None) if zero0 else tr.engine.get_global_grad_norm()
        steps.append({"step": s, "skipped": bool(rec.get("skipped")), "loss": rec["loss"],
                      "grad_norm": rec["grad_norm"],
                      "ds_norm": None if ds_norm is None else float(ds_norm),
                      "change": None if before is None else max_change(before, after),
                      "optimizer_steps": optimizer_step_count(tr.engine)})
        before = after
    tr.close()
    return steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--ds")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    base = validate(load_config(a.config, a.overrides))
    dist = distributed.init(base.parallel.tp, base.parallel.pp)
    out = {}
    for ds in a.ds.split(","):
        cfg = dataclasses.replace(base, train=dataclasses.replace(
            base.train, deepspeed_config=ds,
            out_dir=os.path.join(base.train.out_dir, os.path.basename(ds))))
        validate(cfg, world_size=dist.world)
        out[ds] = run(cfg, dist)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
