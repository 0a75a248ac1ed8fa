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
