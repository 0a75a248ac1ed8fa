"""When a stop signal may abort at once (watchdog._hang): only a training step that made no
progress for max(HANG_SIGNAL_S, 10x the longest phase so far), capped by the timeout; a long
save, evaluation or expansion is let finish."""
import time

import pytest

from apollo_ds.training import watchdog


@pytest.fixture
def state(monkeypatch):
    st = dict(watchdog._state)
    monkeypatch.setattr(watchdog, "_state", st)
    return st


def _stalled(st, phase: str, seconds: float, longest: float, timeout_s=None):
    st.update(phase=phase, since=time.monotonic() - seconds, longest=longest,
              timeout_s=timeout_s)
    return watchdog._hang()


def test_a_stalled_step_is_a_hang(state):
    assert _stalled(state, "step 4", 100, 1.0).startswith("no progress in step 4 for 100 s")


def test_a_step_within_its_bound_is_not(state):
    assert _stalled(state, "step 4", 30, 1.0) is None             # under HANG_SIGNAL_S = 60
    assert _stalled(state, "step 4", 100, 20.0) is None           # under 10 x the longest
    assert _stalled(state, "step 4", 100, 20.0, timeout_s=90) is not None   # timeout caps it


@pytest.mark.parametrize("phase", ["checkpoint save after step 3", "evaluation after step 3",
                                   "expansion before step 4"])
def test_saves_evaluations_and_expansions_are_let_finish(state, phase):
    assert _stalled(state, phase, 1000, 1.0) is None


def test_start_up_is_never_a_hang(state):
    assert _stalled(state, None, 10_000, 0.0) is None


def test_progress_records_the_longest_phase(state):
    state.update(phase="step 1", since=time.monotonic() - 5, longest=0.0)
    watchdog.progress("step 2")
    assert 5 <= state["longest"] < 6 and state["phase"] == "step 2"


def test_a_pause_does_not_count_toward_a_hang(state):
    # a step 100 s old whose process was stopped for 95 of them (the poll slept 96 s for 1 s)
    # has waited 5 s; a poll that merely ran late under load counts in full
    state.update(phase="step 4", since=time.monotonic() - 100, longest=1.0, timeout_s=60.0)
    watchdog.skip_pause(watchdog.PARENT_POLL_S + watchdog.PAUSE_GAP_S - 1)
    assert watchdog._hang().startswith("no progress in step 4 for 100 s")
    watchdog.skip_pause(96.0)
    waited = time.monotonic() - state["since"]
    assert 4.9 < waited < 6 and watchdog._hang() is None


_STOPPED = r"""
import sys, time
from apollo_ds.training import watchdog
watchdog.PAUSE_GAP_S = 2.0
watchdog.configure(0, 6 / 60)            # train.dist_timeout_minutes: 6 s
watchdog.progress("step 1")
watchdog.start()
print("ready", flush=True)
time.sleep(60)                           # a step that never ends
"""


def test_a_stopped_process_resumes_and_a_real_hang_still_ends_it():
    """A real process: stopped for 10 s (past its 6 s timeout) 1 s into a step, continued, it
    is alive 3 s later (it has waited about 4 s of running time), then still exits as hung
    (exit 5) once it has waited 6 s running."""
    import os
    import signal
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", _STOPPED], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(10.0)
        os.kill(p.pid, signal.SIGCONT)
        t0 = time.monotonic()
        time.sleep(3.0)
        assert p.poll() is None, p.stderr.read()
        assert p.wait(timeout=30) == watchdog.EXIT_HANG
        assert time.monotonic() - t0 >= 3.0
        assert "no progress in step 1" in p.stderr.read()
    finally:
        p.kill()
