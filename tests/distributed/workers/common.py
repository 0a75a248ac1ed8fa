"""Start-up shared by the torchrun test workers: parse --config/--out/overrides, validate,
initialise the process groups and build the Trainer exactly as pretrain.py does; ``finish``
leaves together and tears the process groups down, as pretrain.py does."""
import argparse

from apollo_ds.lazy_compile import import_heavy

import_heavy()   # as pretrain.py does: no TorchInductor at start-up
from apollo_ds import distributed  # noqa: E402
from apollo_ds.config import load_config, validate  # noqa: E402
from apollo_ds.training.loop import Trainer  # noqa: E402


def start():
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--out")
    p.add_argument("--mid", help="STEP:PATH: also dump the full weights right after the "
                                 "checkpoint of STEP (train_and_dump.py)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    cfg = validate(load_config(a.config, a.overrides))
    dist = distributed.init(cfg.parallel.tp, cfg.parallel.pp)
    validate(cfg, world_size=dist.world)
    return a, cfg, dist, Trainer(cfg, dist)


def finish() -> int:
    distributed.shutdown()
    return 0
