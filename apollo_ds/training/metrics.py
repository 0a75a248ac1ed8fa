"""Per-step metrics: JSON lines (one record per optimizer step, plus eval records), TensorBoard
(``tb_scalars``: train/, eval/loss, apollo/depth and unique layers, by_tokens/ with tokens as
x), DeepSpeed's monitors (wandb) when its config enables them, and a console line per log
interval. Only the writer rank (global rank 0) writes."""
from __future__ import annotations

import json
import os
import resource
import sys

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by substrings of the CUDA device name;
# the first row whose substrings all occur wins, so the more specific rows come first ("A100"
# before "A10", "L40S" before "L4"). None: no usable bf16 peak known. MFU is taken against
# this peak whatever the run's dtype (an fp32 run's TF32 peak is half of it).
PEAK_BF16_TFLOPS = [
    (("H100", "PCIE"), 756, "H100 PCIe"),
    (("H100", "NVL"), 835, "H100 NVL"),
    (("H100",), 989, "H100 SXM"),
    (("H200", "NVL"), 835, "H200 NVL"),
    (("H200",), 989, "H200"),            # also GH200
    (("B200",), 2250, "B200"),
    (("A100",), 312, "A100"),
    (("L40S",), 362, "L40S"),
    (("L40",), 181, "L40"),
    (("A10G",), None, "A10G"),           # AWS part with its own clocks
    (("A10",), 125, "A10"),
    (("L4",), 121, "L4"),
    (("RTX 4090",), 165, "RTX 4090"),
    (("RTX 3090",), 71, "RTX 3090"),
    (("A6000",), 155, "RTX A6000"),
    (("V100",), None, "V100 (no bf16 tensor cores)"),
]


def peak_for(name: str) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s or None, which table row) for a device name."""
    up = name.upper()
    for subs, tflops, label in PEAK_BF16_TFLOPS:
        if all(sub in up for sub in subs):
            return tflops, f"table row '{label}'"
    return None, "no table row"


class DeviceStats:
    """Per-device figures for the step line: model TFLOP/s per device, MFU against the card's
    peak (CUDA only), peak memory (CUDA allocated, or the process's peak RSS on CPU). Reads
    allocator counters only: no device sync."""

    def __init__(self, device, peak_tflops: float | None = None):
        import torch
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.peak = peak_tflops
        if self.cuda and self.peak is None:
            self.peak, _ = peak_for(torch.cuda.get_device_name(device))

    def peak_memory_gib(self) -> float:
        if self.cuda:
            import torch
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux

    def fields(self, flops_per_s: float, devices: int) -> dict:
        tflops = flops_per_s / devices / 1e12
        return {"tflops_per_device": tflops,
                "mfu": tflops / self.peak if self.peak else None,
                "peak_mem_gib": self.peak_memory_gib(),
                "peak_mem_kind": "cuda_allocated" if self.cuda else "host_rss"}

    def text(self, flops_per_s: float, devices: int) -> str:
        f = self.fields(flops_per_s, devices)
        mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
        mem = "GiB allocated" if self.cuda else "GiB RSS"
        return (f"{f['tflops_per_device']:.3f} TFLOP/s/{'GPU' if self.cuda else 'proc'} | "
                f"MFU {mfu} | peak mem {f['peak_mem_gib']:.2f} {mem}")


class MetricsLog:
    def __init__(self, out_dir: str, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = None
        self.monitor = None     # () -> DeepSpeed's MonitorMaster of the current engine
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
            for tag, v, x in tb_scalars(record):
                self.tb.add_scalar(tag, v, x)
        if self.monitor is not None:   # DeepSpeed's monitors (wandb, ...) when configured
            mon = self.monitor()
            if mon is not None and mon.enabled:
                mon.write_events([(t, v, x) for t, v, x in tb_scalars(record)
                                  if not t.startswith("by_tokens/")])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


# per-step values that are settings, not measurements (not plotted every step)
_CONSTANT = {"tokens", "full_depth_flops", "step"}


def tb_scalars(record: dict) -> list[tuple[str, float, int]]:
    """(tag, value, x) of one metrics record: eval loss under eval/loss, the Apollo depth
    (mean over the step's micro-batches) and pool size under apollo/, the rest under train/,
    all by step; loss and eval loss again under by_tokens/ with tokens seen as x."""
    step = record["step"]
    if record.get("kind") == "eval":
        return [(f"eval/{k}", v, step) for k, v in record.items() if _number(v)
                and k != "step"]
    out = []
    for k, v in record.items():
        if k == "eval_loss" and _number(v):
            out.append(("eval/loss", v, step))
        elif k == "n_unique":
            out.append(("apollo/unique_layers", v, step))
        elif _number(v) and k not in _CONSTANT:
            out.append((f"train/{k}", v, step))
    if record.get("depths"):
        out.append(("apollo/depth", sum(record["depths"]) / len(record["depths"]), step))
    tokens = record.get("cum_tokens")
    if tokens is not None:
        out += [(f"by_tokens/{name}", record[k], int(tokens)) for k, name in
                (("loss", "loss"), ("eval_loss", "eval_loss")) if _number(record.get(k))]
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# set by run_log.RunLog on rank 0: () -> " | HH:MM:SS | elapsed H:MM:SS", appended to every
# line print0 writes that does not carry its own clock (the step lines add the ETA too)
clock = None


def print0(rank: int, msg: str) -> None:
    if rank == 0:
        if clock is not None and " | elapsed " not in msg:
            msg += clock()
        print(msg, file=sys.stdout, flush=True)
