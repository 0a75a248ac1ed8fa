"""Run under torchrun with train.compile=true: the whole run (Trainer.run: expansions,
evaluation, checkpoint), recording after every optimizer step how many graphs torch.compile
has built so far (torch._dynamo's unique_graphs counter). Rank 0 writes
{"graphs_after_step": [...]} to --out; metrics.jsonl holds the losses.

usage: compile_check.py --config CFG --out RESULT.json [overrides]"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402


def main():
    a, cfg, dist, tr = start()
    from torch._dynamo.utils import counters
    graphs = []
    step = tr.train_step

    def counted(s):
        rec = step(s)
        graphs.append(counters["stats"]["unique_graphs"])
        return rec
    tr.train_step = counted
    tr.run()
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump({"graphs_after_step": graphs}, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
