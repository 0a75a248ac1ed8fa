"""Run under torchrun: several short training runs in one process (one Trainer each, the same
process groups), each recording per step its loss, gradient norm, layer maps and this rank's
full gradients right before the optimizer step (DeepSpeed's safe_get_full_grad: the reduced
gradient, whole over DP at any ZeRO stage, this rank's TP shard / pipeline stage). Runs that
share a ``group`` are compared with the group's recompute=none run on every rank.

usage: recompute_matrix.py --config BASE.yaml --cases CASES.json --out RESULT.json
CASES.json: [{"name", "group", "recompute", "overrides": [...]}, ...], a group's "none" first.
RESULT.json (rank 0): name -> {"losses", "grad_norms", "layer_maps", "finite", "grad_rel",
"grad_rel_at", "grad_scale"}; grad_rel is the largest max|g - g_none| / max|g_none| over every
parameter and step, maximised over the ranks."""
import argparse
import json
import math
import sys
import time

from apollo_ds.lazy_compile import import_heavy

import_heavy()   # as pretrain.py does: no TorchInductor at start-up
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from apollo_ds import distributed  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.distributed import all_reduce  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402


def capture(runtime, sink: list) -> None:
    """Wrap ``runtime.run_step`` so its guard (called once per optimizer step, after the
    gradient reduction, before the update) first records every gradient of this rank."""
    run_step = runtime.run_step

    def wrapped(step, plan, guard=None):
        def recording_guard(loss_share, norm, is_global):
            grads = {}
            for name, p in runtime.named_parameters():
                g = safe_get_full_grad(p)   # collective at ZeRO-3: every rank, same order
                grads[name] = g.detach().float().cpu().clone()
            sink.append(grads)
            return guard(loss_share, norm, is_global)
        return run_step(step, plan, recording_guard)

    runtime.run_step = wrapped


def train(cfg, dist) -> tuple[list[dict], list[dict]]:
    tr = Trainer(cfg, dist)
    grads: list[dict] = []
    capture(tr.runtime, grads)
    recs = []
    for s in range(1, cfg.train.steps + 1):
        n = tr.schedule.unique_at(s)
        if n > tr.model.n_unique:
            tr.expand(n)
        recs.append(tr.train_step(s))
        tr.step = s
    tr.close()
    return recs, grads


def compare(grads: list[dict], ref: list[dict]) -> tuple[float, str, float]:
    worst, where, scale = 0.0, "", 0.0
    for step, (g, r) in enumerate(zip(grads, ref), start=1):
        assert g.keys() == r.keys()
        for name in r:
            s = r[name].abs().max().item()
            scale = max(scale, s)
            rel = (g[name] - r[name]).abs().max().item() / max(s, 1e-30)
            if rel > worst:
                worst, where = rel, f"{name} at step {step}"
    return worst, where, scale


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
    result, ref = {}, {}
    for case in cases:
        overrides = case["overrides"] + [f"train.recompute={case['recompute']}",
                                         f"train.out_dir={case['out_dir']}"]
        cfg = validate(load_config(a.config, overrides), world_size=dist.world)
        t0 = time.perf_counter()
        recs, grads = train(cfg, dist)
        losses = [r["loss"] for r in recs]
        rec = {"losses": losses, "grad_norms": [r["grad_norm"] for r in recs],
               "layer_maps": [r["layer_maps"] for r in recs],
               "finite": all(x is not None and math.isfinite(x) for x in losses),
               "seconds": time.perf_counter() - t0}
        if case["recompute"] == "none":
            ref[case["group"]] = grads
        else:
            worst, where, scale = compare(grads, ref[case["group"]])
            rec["grad_rel"] = all_reduce([worst], op="max").tolist()[0]
            rec["grad_scale"] = all_reduce([scale], op="max").tolist()[0]
            rec["grad_rel_at"] = where   # rank 0's worst
        # the gradient norm at step 1, over this rank's parameters: equal on the ranks of a
        # DP group and across ZeRO stages when the captured gradients are the full reduced ones
        fp = math.sqrt(sum(g.double().pow(2).sum().item() for g in grads[0].values()))
        rec["grad_fp_max"] = all_reduce([fp], op="max").tolist()[0]
        rec["grad_fp_min"] = all_reduce([fp], op="min").tolist()[0]
        result[case["name"]] = rec
        if dist.rank == 0:
            print(f"{case['name']}: {rec}", flush=True)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
