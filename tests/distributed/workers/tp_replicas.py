"""Run under torchrun at parallel.tp > 1: a full pretraining run, then, for every parameter
that tensor parallelism replicates (norms, row-parallel biases, position embeddings), the
largest difference between the TP ranks' copies; rank 0 writes {name: max_abs_diff} to --out.

usage: tp_replicas.py --config CFG --out RESULT.json [overrides]"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from apollo_ds.distributed import all_gather_tensor  # noqa: E402


def main():
    a, cfg, dist, tr = start()
    tr.run()
    group = parallel_state.get_tensor_model_parallel_group()
    diffs = {}
    for name, p in tr.runtime.named_parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        copies = all_gather_tensor(p.detach().float().cpu(), group=group)
        diffs[name] = max((c - copies[0]).abs().max().item() for c in copies)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(diffs, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
