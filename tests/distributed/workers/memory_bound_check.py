"""Run under torchrun: train to a stage boundary, expand, train a step, save, and record how many
bytes of gathered tensors each rank held at once during the expansion and during the save
(none: a save writes each rank's own fragments), and how many bytes the save wrote per rank.

Every helper that returns another rank's data (DeepSpeed's safe_get_full_*, state.read_entry,
distributed.all_gather_tensor, shards.ShardSource.gather) is wrapped where the training code
calls it; each tensor it returns is tracked until it is freed (weakref finalizers, one count
per storage), so the peak is the largest set of simultaneously live gathered tensors.

usage: memory_bound_check.py --config CFG --out RESULT.json [overrides]"""
import json
import math
import os
import sys
import weakref

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import finish, start  # noqa: E402

from apollo_ds import distributed  # noqa: E402
from apollo_ds.training import checkpoint, portable, shards, state  # noqa: E402


class Live:
    def __init__(self):
        self.refs, self.live, self.peak, self.total, self.calls = {}, 0, 0, 0, 0

    def reset(self):
        self.peak, self.total, self.calls = self.live, 0, 0

    def track(self, obj):
        if isinstance(obj, dict):
            for v in obj.values():
                self.track(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.track(v)
        elif torch.is_tensor(obj):
            st = obj.untyped_storage()
            ptr, nb = st.data_ptr(), st.nbytes()
            if ptr not in self.refs:
                self.refs[ptr] = 0
                self.live += nb
                self.total += nb
                self.peak = max(self.peak, self.live)
            self.refs[ptr] += 1
            weakref.finalize(obj, self._free, ptr, nb)

    def _free(self, ptr, nb):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nb

    def wrap(self, module, name):
        fn = getattr(module, name)

        def wrapped(*a, **k):
            self.calls += 1
            out = fn(*a, **k)
            self.track(out)
            return out
        setattr(module, name, wrapped)


def main():
    a, cfg, dist, tr = start()
    live = Live()
    for mod, names in ((state, ("safe_get_full_fp32_param", "safe_get_full_optimizer_state",
                                "read_entry")),
                       # a save writes this rank's own fragments: nothing may be gathered
                       (portable, ("read_entry", "all_gather_tensor")),
                       (distributed, ("all_gather_tensor",)),
                       (shards.ShardSource, ("gather",))):
        for n in names:
            if hasattr(mod, n):
                live.wrap(mod, n)
    built = []   # per model built during the expansion: was every parameter already a shard?
    rt_new_model = tr.runtime.new_model

    def new_model(n):
        m = rt_new_model(n)
        built.append(all(hasattr(p, "ds_id") and p.numel() == 0
                         and p.ds_tensor.numel() <= -(-p.ds_numel // dist.dp)
                         for p in m.parameters()))
        return m
    tr.runtime.new_model = new_model
    boundary = tr.schedule.end_step(0)
    for s in range(1, boundary + 1):
        tr.train_step(s)
        tr.step = s
    n_new = tr.schedule.unique_at(boundary + 1)
    live.reset()
    tr.expand(n_new)
    expand = {"peak": live.peak, "total": live.total, "calls": live.calls}
    tp_numel = [p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                for _, p in tr.runtime.named_parameters()]
    tr.train_step(boundary + 1)
    tr.step = boundary + 1
    live.reset()
    tr.save()
    save = {"peak": live.peak, "total": live.total, "calls": live.calls}
    tag_dir = os.path.join(tr.ckpt_dir, checkpoint.find_latest(tr.ckpt_dir)[0])
    save["bytes"] = os.path.getsize(os.path.join(tag_dir, portable.PARAMS,
                                                 f"rank_{dist.rank:05d}.bin"))
    rec = {"rank": dist.rank, "expand": expand, "save": save, "built_partitioned": built,
           "tp_numel": tp_numel, "largest_tp_numel": max(tp_numel),
           "full_numel": [math.prod(m["shape"]) for m in json.load(open(os.path.join(
               tag_dir, portable.PARAMS, portable.INDEX)))["params"].values()]}
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, rec)
    if dist.rank == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    return finish()


if __name__ == "__main__":
    sys.exit(main())
