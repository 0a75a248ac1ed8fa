"""Run under torchrun at parallel.pp > 1: a full pretraining run (resuming if a checkpoint
exists), then write the gathered full weights (PoolGPT names, each pool layer from its first
owner stage) to --out, and every stage's own weights to --out.stages.pt (rank 0)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import start  # noqa: E402

from apollo_ds.model.pipeline import full_state_dict  # noqa: E402


def main():
    a, cfg, dist, tr = start()
    tr.run()
    sd, per_stage = full_state_dict(tr.model, cfg.model.vocab_size)
    if dist.rank == 0:
        torch.save(sd, a.out)
        torch.save(per_stage, a.out + ".stages.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
