"""No orphans, no silent hangs: one daemon thread per training process.

- Launcher death. Workers of torchrun run in their own sessions, so a launcher killed with
  SIGKILL sends them nothing and they would live on, blocked on a peer or the dead launcher's
  store, holding their memory (their GPUs on a GPU node). The thread notices that the process
  was re-parented (``os.getppid()`` changed) and exits within ``PARENT_POLL_S`` seconds plus
  ``ORPHAN_GRACE_S``, with one line. No checkpoint is attempted: the peers may be gone, and the
  newest complete checkpoint is intact (saves are atomic).
- Hangs. The Trainer reports progress at every step, save, expansion and evaluation
  (``progress(phase)``). From the first step on, a phase that makes no progress for
  ``train.dist_timeout_minutes`` (a collective waiting on a dead or hung peer; Megatron's
  ``--distributed-timeout-minutes``)
  ends the process with one line naming the rank and the phase. A stop signal during a step
  that hangs (no progress for ``HANG_SIGNAL_S`` or 10x the longest phase so far) aborts at
  once; a long save, evaluation or expansion is let finish.
- Pauses. A stopped process (SIGSTOP, ``scontrol suspend``, a frozen VM) makes no progress by
  design: a poll that wakes more than ``PAUSE_GAP_S`` late moves the hang clock forward by the
  time slept, so a job resumed after a long suspension goes on instead of exiting as hung.
Imports nothing heavy; exits with ``EXIT_ORPHAN`` / ``EXIT_HANG``."""
from __future__ import annotations

import os
import sys
import threading
import time

from apollo_ds.training import signals

EXIT_ORPHAN = 4
EXIT_HANG = 5
PARENT_POLL_S = 1.0
ORPHAN_GRACE_S = 2.0
HANG_SIGNAL_S = 60.0
PAUSE_GAP_S = 30.0   # a poll this much later than asked: the process was stopped, not hung

# "phase" None: start-up (imports, process groups, data index builds, engine build, checkpoint
# load), which can legitimately take long on one rank while the others wait; only the process
# group's own (longer) timeout bounds it. The hang clock starts with the first step.
_state = {"rank": None, "phase": None, "since": time.monotonic(), "longest": 0.0,
          "timeout_s": None, "started": False, "parent": 0}
_lock = threading.Lock()


def _say(msg: str) -> None:
    who = f"rank {_state['rank']}" if _state["rank"] is not None else f"pid {os.getpid()}"
    print(f"error: {who}: {msg}", file=sys.stderr, flush=True)


def progress(phase: str) -> None:
    """The run moved on and now enters ``phase`` (e.g. "step 12", "save at step 12")."""
    now = time.monotonic()
    with _lock:
        if _state["phase"] is not None:
            _state["longest"] = max(_state["longest"], now - _state["since"])
        _state["phase"], _state["since"] = phase, now


def configure(rank: int, timeout_minutes: float) -> None:
    with _lock:
        _state["rank"], _state["timeout_s"] = rank, 60.0 * timeout_minutes


def _hang() -> str | None:
    """The current phase, described, when it has stalled long enough that a stop signal should
    not wait for it; None otherwise. Only training steps count: a save, an evaluation or an
    expansion that runs long is let finish (a save cut short would lose every step since the
    previous checkpoint); the watchdog's own timeout still bounds them."""
    with _lock:
        if _state["phase"] is None or not _state["phase"].startswith("step"):
            return None
        waited = time.monotonic() - _state["since"]
        bound = max(HANG_SIGNAL_S, 10 * _state["longest"])
        if _state["timeout_s"] is not None:
            bound = min(bound, _state["timeout_s"])
        if waited > bound:
            return f"no progress in {_state['phase']} for {waited:.0f} s"
    return None


def orphaned() -> bool:
    """The launcher that started this process is gone (it was re-parented)."""
    parent = _state.get("parent", 0)
    return parent > 1 and os.getppid() != parent


def exit_orphaned() -> None:
    _say(f"the launcher (pid {_state['parent']}) is gone (during {_state['phase'] or 'start-up'}); "
         f"exiting. "
         f"The newest complete checkpoint is intact: rerun the command to resume")
    os._exit(EXIT_ORPHAN)


def skip_pause(slept: float) -> None:
    """The poll loop slept ``slept`` seconds for ``PARENT_POLL_S``: beyond ``PAUSE_GAP_S``
    more, the whole process was stopped, and that time does not count as waiting."""
    if slept > PARENT_POLL_S + PAUSE_GAP_S:
        with _lock:
            _state["since"] = min(_state["since"] + slept - PARENT_POLL_S, time.monotonic())


def _loop() -> None:
    last = time.monotonic()
    while True:
        time.sleep(PARENT_POLL_S)
        now = time.monotonic()
        skip_pause(now - last)
        last = now
        if orphaned():
            time.sleep(ORPHAN_GRACE_S)   # let a launcher's own shutdown signal arrive first
            exit_orphaned()
        with _lock:
            # measured at `now`, the time the pause check used: a stop that lands after it is
            # seen by the next poll, never counted here as waiting
            timeout, phase = _state["timeout_s"], _state["phase"]
            waited = now - _state["since"]
        if phase is not None and timeout is not None and waited > timeout:
            _say(f"no progress in {phase} for {waited / 60:.1f} min (train.dist_timeout_minutes="
                 f"{timeout / 60:g}): a peer died or hangs; exiting. The newest complete "
                 f"checkpoint is intact: rerun the command to resume")
            os._exit(EXIT_HANG)


def start() -> None:
    """Start the thread once (pretrain.py, right after the signal handlers)."""
    if _state["started"]:
        return
    _state["started"], _state["parent"] = True, os.getppid()
    signals.hang_check = _hang
    threading.Thread(target=_loop, name="apollo-watchdog", daemon=True).start()
