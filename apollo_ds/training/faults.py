"""TEST-ONLY fault injection, read from the environment variable APOLLO_DS_FAULT in this one
place. Unset (always, outside the test suite) it does nothing. Items are separated by ',':

  nan_loss@step=3           the loss of step 3 reads NaN, its gradients stay finite (only the
                            loss check can catch it; DeepSpeed would apply the step)
  nan_grad@step=3-5         steps 3..5: the loss stays finite, every gradient is NaN
  inf_grad@step=3@rank=1    only on global rank 1 (the others must still agree to skip/stop)
  sleep_save@s=1.5          every checkpoint save sleeps 1.5 s after the ranks' state files
                            are written and before the manifest and ``latest`` (kill -9 trials)
  sleep_expand@s=1.5        every Apollo expansion sleeps 1.5 s between the old engine's
                            teardown and the new one's build
  enospc_save@step=4@rank=1 the save of step 4 fails on rank 1 with ENOSPC (a full disk)
                            right after its state file is written

A sleeping process prints ``fault: sleep_<where> ...`` first, so a test can aim a kill."""
from __future__ import annotations

import os
import sys
import time

import torch

ENV = "APOLLO_DS_FAULT"
KINDS = ("nan_loss", "nan_grad", "inf_grad", "sleep_save", "sleep_expand", "enospc_save")


def _parse(text: str) -> list[dict]:
    items = []
    for raw in filter(None, (t.strip() for t in text.split(","))):
        kind, *pairs = raw.split("@")
        if kind not in KINDS:
            raise ValueError(f"{ENV}: unknown fault '{kind}' in {text!r}; one of {KINDS}")
        item = {"kind": kind}
        for pair in pairs:
            key, _, val = pair.partition("=")
            if key == "step":
                lo, _, hi = val.partition("-")
                item["steps"] = (int(lo), int(hi or lo))
            elif key == "rank":
                item["rank"] = int(val)
            elif key == "s":
                item["s"] = float(val)
            else:
                raise ValueError(f"{ENV}: unknown key '{key}' in {raw!r} (step, rank, s)")
        items.append(item)
    return items


_ITEMS = _parse(os.environ.get(ENV, ""))
ACTIVE = bool(_ITEMS)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _match(kind: str, step: int | None = None) -> dict | None:
    for it in _ITEMS:
        if it["kind"] != kind or it.get("rank", _rank()) != _rank():
            continue
        lo, hi = it.get("steps", (step, step))
        if step is None or lo <= step <= hi:
            return it
    return None


class _BadGrad(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient by ``value``."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, ctx.value), None


def loss(value: torch.Tensor, step: int) -> torch.Tensor:
    """The micro-batch loss of ``step`` with this rank's injected fault, if any."""
    if not _ITEMS:
        return value
    if _match("nan_loss", step):   # value NaN, d/dvalue still 1
        return value + (torch.full_like(value, float("nan")) - value.detach())
    if _match("nan_grad", step):
        return _BadGrad.apply(value, float("nan"))
    if _match("inf_grad", step):
        return _BadGrad.apply(value, float("inf"))
    return value


def sleep(where: str, what: str = "") -> None:
    """``sleep_<where>``: announce, then sleep (where: save, expand)."""
    it = _match(f"sleep_{where}") if _ITEMS else None
    if it:
        print(f"fault: sleep_{where} {it.get('s', 1.0)} s {what}".rstrip(), flush=True,
              file=sys.stdout)
        time.sleep(it.get("s", 1.0))


def disk_full(step: int, path: str) -> None:
    """``enospc_save``: raise the OSError a full disk gives while writing ``path``."""
    if _ITEMS and _match("enospc_save", step):
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
