"""Run under torchrun: a full pretraining run (resuming if a checkpoint exists), then write the
gathered full weights to --out (rank 0), with --mid STEP:PATH also those right after the
checkpoint of STEP; at pp > 1 (PoolGPT names, each pool layer from its
first owner stage) also every stage's own weights to --out.stages.pt."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402


def main():
    a, cfg, dist, tr = start()
    if a.mid:   # the weights a mid-run checkpoint holds, from the live model
        step, path = a.mid.split(":", 1)
        save = tr.save

        def save_and_dump():
            save()
            if tr.step == int(step):
                sd = tr.runtime.full_weights()
                if dist.rank == 0:
                    torch.save(sd, path)
        tr.save = save_and_dump
    tr.run()
    if dist.pp > 1:
        sd, per_stage = tr.runtime.full_weights_per_stage()
    else:
        sd, per_stage = tr.runtime.full_weights(), None
    if dist.rank == 0:
        torch.save(sd, a.out)
        if per_stage is not None:
            torch.save(per_stage, a.out + ".stages.pt")
    return finish()


if __name__ == "__main__":
    sys.exit(main())
