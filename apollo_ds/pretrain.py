"""Pretrain a GPT with DeepSpeed (+ Apollo progressive training when apollo.enabled).

  deepspeed --num_gpus 2 apollo_ds/pretrain.py --config configs/tiny_cpu.yaml [overrides]
  torchrun --nproc_per_node 2 apollo_ds/pretrain.py --config ... ;  mpirun -np 2 python ...
  srun python apollo_ds/pretrain.py --config ...          (see slurm/pretrain_gpt.sh)

Overrides are dotted ``section.key=value`` pairs, e.g. ``model.layers=6 train.steps=40``.
Rerunning the same command resumes from the latest complete checkpoint in train.out_dir.
Exit codes: 0 done (or stopped by a signal, with a checkpoint); 2 a bad config, launch or
input, refused before any work; 3 a non-finite loss or gradient stopped the run before its
optimizer step (train.on_nonfinite, train.max_skipped); 4 the launcher died; 5 no progress for
train.dist_timeout_minutes (a dead or hung peer); 6 a checkpoint could not be written (no room,
a full disk, permissions; earlier checkpoints intact); 128+N a second signal N aborted the run;
anything else: a crash.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script by a launcher: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apollo_ds.config import ConfigError, load_config, validate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run preset YAML (configs/*.yaml)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON; default: the preset's train.deepspeed_config")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p.parse_args(argv)


def _launcher_rank() -> int:
    """This process's rank before torch.distributed starts, so only one rank prints errors."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _launcher_world() -> int | None:
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def main(argv=None, watch: bool | None = None) -> int:
    """``watch`` (default: when run from the command line, argv None) starts the watchdog
    thread, which may end the process: never inside a host process such as a test runner."""
    # First of all: a stop request during imports, start-up or checkpoint load is honoured.
    from apollo_ds.training import signals, watchdog
    signals.install()
    if watch is None:
        watch = argv is None
    if watch:
        watchdog.start()   # exits when the launcher dies or a phase hangs (no orphans)
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.deepspeed_config:
            overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
        cfg = load_config(args.config, overrides)
        # every input (config, DeepSpeed config, launch env, out_dir, data, checkpoint) before
        # any process group or engine exists
        from apollo_ds.preflight import check_inputs
        check_inputs(cfg, world=_launcher_world(), rank=_launcher_rank())
    except ConfigError as e:
        if _launcher_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from apollo_ds.lazy_compile import import_heavy
    import_heavy()   # without TorchInductor: ~1.3 s less start-up per process
    from apollo_ds import distributed
    from apollo_ds.training.loop import Trainer
    watchdog.configure(_launcher_rank(), cfg.train.dist_timeout_minutes)
    dist = distributed.init(cfg.parallel.tp, cfg.parallel.pp,
                            timeout_minutes=cfg.train.dist_timeout_minutes)
    try:
        validate(cfg, world_size=dist.world)
        trainer = Trainer(cfg, dist)
    except ConfigError as e:
        if dist.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    from apollo_ds.training.loop import EXIT_SAVE, SaveError
    from apollo_ds.training.nonfinite import EXIT_NONFINITE, NonFiniteError
    try:
        trainer.run()
    except NonFiniteError as e:
        # every rank agreed on it (one reduction), so all leave together
        if dist.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        distributed.shutdown()
        return EXIT_NONFINITE
    except SaveError as e:
        if e.own:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if e.agreed:
            distributed.shutdown()
            return EXIT_SAVE
        os._exit(EXIT_SAVE)   # the peers may wait inside the save: the launcher ends them
    except Exception:
        if watchdog.orphaned():   # a peer left with the dead launcher: one line, no traceback
            watchdog.exit_orphaned()
        raise
    # Only after a clean run: on an error the peers may be gone, and the launcher ends them.
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
