"""Run under torchrun: 11 optimizer steps through Trainer.train_step with counters on
every way the host can wait for the device: the accelerator's synchronize (DeepSpeed's
get_accelerator() and torch.cuda), and reading a tensor into Python (Tensor.item, .tolist,
.cpu, and the implicit __bool__ / __float__ / __int__). Rank 0 writes every rank's counts per
step and where (file:line outside torch) the reads came from.

train.steps >= 11 and no expansion before step 12.

usage: sync_count.py --config CFG --out RESULT.json [overrides]"""
import collections
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402

COUNTS = collections.Counter()
WHERE = collections.Counter()
ON = [False]


def _counted(kind, fn):
    def wrapper(*args, **kwargs):
        if ON[0]:
            ON[0] = False   # a counted call's own internals are not counted again
            try:
                stack, what = traceback.extract_stack()[:-1], kind
                if any("torch/optim/" in f.filename for f in stack):
                    # torch's non-fused AdamW keeps its step counter as a CPU tensor and reads
                    # it (no device involved); the fused AdamW used on CUDA reads nothing
                    what = "optimizer_cpu_step_counter"
                COUNTS[what] += 1
                frames = [f for f in stack if "site-packages/torch" not in f.filename]
                f = frames[-1]
                WHERE[f"{what} {os.path.basename(f.filename)}:{f.lineno}"] += 1
                return fn(*args, **kwargs)
            finally:
                ON[0] = True
        return fn(*args, **kwargs)
    return wrapper


def install() -> None:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    acc.synchronize = _counted("synchronize", acc.synchronize)
    torch.cuda.synchronize = _counted("synchronize", torch.cuda.synchronize)
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        setattr(torch.Tensor, name, _counted(name, getattr(torch.Tensor, name)))


def main():
    a, cfg, dist, tr = start()
    install()
    per_step = []
    for s in range(1, 12):   # within the first Apollo stage (no expansion on this path)
        COUNTS.clear()
        ON[0] = True
        tr.train_step(s)
        ON[0] = False
        per_step.append(dict(COUNTS))
    gathered = [None] * dist.world
    torch.distributed.all_gather_object(gathered, {"steps": per_step, "where": dict(WHERE)})
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(gathered, f, indent=1)
    tr.close()
    return finish()


if __name__ == "__main__":
    sys.exit(main())
