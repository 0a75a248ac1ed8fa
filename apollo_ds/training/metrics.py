"""Per-step metrics: JSON lines (one record per optimizer step, plus eval records), TensorBoard,
and a console line per log interval. Only the writer rank (global rank 0) writes."""
from __future__ import annotations

import json
import os
import sys


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional (pip extra [tensorboard]); metrics.jsonl is not
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """A resumed run appends; drop records a crashed run wrote after its last checkpoint,
        so the file holds every step exactly once."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and not isinstance(v, bool):
                    self.tb.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def print0(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stdout, flush=True)
