"""Run under torchrun at parallel.pp > 1: a full pretraining run (resuming if a checkpoint
exists), then write the gathered full weights (PoolGPT names, each pool layer from its first
owner stage) to --out, and every stage's own weights to --out.stages.pt (rank 0)."""
import argparse
import sys

import torch

from apollo_ds import distributed
from apollo_ds.config import load_config, validate
from apollo_ds.model.pipeline import full_state_dict
from apollo_ds.training.loop import Trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = validate(load_config(a.config, a.overrides))
    dist = distributed.init(cfg.parallel.tp, cfg.parallel.pp)
    validate(cfg, world_size=dist.world)
    tr = Trainer(cfg, dist)
    tr.run()
    sd, per_stage = full_state_dict(tr.model, cfg.model.vocab_size)
    if dist.rank == 0:
        torch.save(sd, a.out)
        torch.save(per_stage, a.out + ".stages.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
