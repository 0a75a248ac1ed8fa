"""Stop requests (SIGTERM from a scheduler's preemption, SIGUSR1 from Slurm's --signal),
recorded from process start: pretrain.py installs the handlers before anything slow (imports,
process groups, engine build, checkpoint load), so a signal at any moment is honoured at the
next safe point: after the current step, with a checkpoint, exit 0. Imports nothing heavy."""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _handler(signum, _frame) -> None:
    _received.append(signum)


def install() -> None:
    """Idempotent; a signal that arrived before a repeated install stays recorded."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is not _handler:
            signal.signal(sig, _handler)


def requested() -> bool:
    return bool(_received)


def names() -> str:
    return ", ".join(signal.Signals(s).name for s in dict.fromkeys(_received))
