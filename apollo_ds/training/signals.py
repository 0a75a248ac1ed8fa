"""Stop requests (SIGTERM from a scheduler's preemption, SIGUSR1 from Slurm's --signal, SIGINT
from Ctrl-C), recorded from process start: pretrain.py installs the handlers before anything
slow (imports, process groups, engine build, checkpoint load), so a signal at any moment is
honoured at the next safe point: after the current step, with a checkpoint, exit 0.

A second signal of a kind already received (a second Ctrl-C, a second SIGTERM) aborts at once,
as does a stop request while the run is hung (watchdog.py: no progress for a while): nothing
is saved then, and the newest complete checkpoint stays what it was (saves are atomic).
Different kinds do not add up: Ctrl-C at a terminal reaches the DeepSpeed launcher's workers
directly and the launcher then sends them SIGTERM; that is still one stop request.
Imports nothing heavy."""
from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received: list[int] = []
# set by watchdog.py: () -> str | None, a description of the hang, or None while progressing
hang_check = None


def _abort(signum: int, why: str) -> None:
    name = signal.Signals(signum).name
    print(f"error: {name} {why}: aborting now without a checkpoint; the newest complete "
          f"checkpoint is intact (rerun the same command to resume from it)",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _handler(signum, _frame) -> None:
    if signum in _received and signum != signal.SIGUSR1:
        _abort(signum, "received twice")
    _received.append(signum)
    hang = hang_check() if hang_check is not None else None
    if hang:
        _abort(signum, f"while the run is hung ({hang})")


def install() -> None:
    """Idempotent; a signal that arrived before a repeated install stays recorded."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handler:
            signal.signal(sig, _handler)


def requested() -> bool:
    return bool(_received)


def names() -> str:
    return ", ".join(signal.Signals(s).name for s in dict.fromkeys(_received))
