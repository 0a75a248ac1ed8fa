"""Run under torchrun: one unique layer run at all 12 positions (apollo, constant_high depth),
one optimizer step per case, each case a Trainer in this process; records every rank's full
reduced gradients before the optimizer step (DeepSpeed's safe_get_full_grad, as
recompute_matrix.py does) and writes them for rank 0 to --out (torch.save: case -> name ->
tensor).

usage: shared_grads_check.py --config BASE.yaml --cases CASES.json --out RESULT.pt
CASES.json: [{"name", "overrides": [...], "sums": bool, "round_bf16": bool}, ...]
  sums=false: the uses are summed by autograd in bf16 (shared_grads switched off)
  round_bf16: every weight rounded to bf16 before the step (an fp32 reference that holds the
  bf16 run's weights exactly)"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recompute_matrix import capture  # noqa: E402

from apollo_ds import distributed  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.model import gpt  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402


def one_step(cfg, dist, case) -> dict:
    tr = Trainer(cfg, dist)
    if case.get("round_bf16"):
        with torch.no_grad():
            for _, p in tr.runtime.named_parameters():
                p.copy_(p.bfloat16().float())
    grads: list[dict] = []
    capture(tr.runtime, grads)
    use_sums = gpt.use_sums
    if not case["sums"]:
        gpt.use_sums = lambda layers, layer_map: {}
    try:
        rec = tr.train_step(1)
    finally:
        gpt.use_sums = use_sums
    tr.close()
    assert all(m == [0] * 12 for m in rec["layer_maps"]), rec["layer_maps"]
    return grads[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--cases")
    p.add_argument("--out")
    a = p.parse_args()
    with open(a.cases) as f:
        cases = json.load(f)
    base = validate(load_config(a.config, cases[0]["overrides"]))
    dist = distributed.init(base.parallel.tp, base.parallel.pp)
    result = {}
    for case in cases:
        cfg = validate(load_config(a.config, case["overrides"]), world_size=dist.world)
        result[case["name"]] = one_step(cfg, dist, case)
        if dist.rank == 0:
            print(f"{case['name']}: done", flush=True)
    if dist.rank == 0:
        torch.save(result, a.out)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
