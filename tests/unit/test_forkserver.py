"""The suite's fork server (tests/forkserver.py) starts ranks as torchrun does: the same
launcher environment, the script as __main__ with its arguments in the repository, the
request's environment read afresh (APOLLO_DS_FAULT is parsed at import), and a failing rank
stops the others and is reported with its exit code."""
import json
import os
import time

import pytest

from tests.conftest import PY, REPO, _FORKSERVER, free_port, run

WORKER = "tests/distributed/workers/launch_env.py"


def _require_server(result) -> None:
    """None means the server did not serve: deliberate only with APOLLO_TEST_LAUNCHER=torchrun
    (then there is nothing to test); otherwise the server is broken, which is a failure."""
    if result is None:
        if os.environ.get("APOLLO_TEST_LAUNCHER", "forkserver") != "forkserver":
            pytest.skip("APOLLO_TEST_LAUNCHER asks for torchrun: the fork server is not used")
        pytest.fail("the fork server did not start: see the apollo_fs_*/server.log it names")


def _records(stdout: str) -> list[dict]:
    recs = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith('{"name"')]
    return sorted(recs, key=lambda r: r["RANK"])


def test_ranks_see_what_torchrun_gives_them(tmp_path):
    port = free_port()
    env = {"APOLLO_DS_FAULT": "nan_loss@step=3@rank=1"}
    mine = _FORKSERVER.launch(2, WORKER, ["a", "b c"], {**env, "OMP_NUM_THREADS": "1"},
                              str(REPO), port, timeout=120)
    _require_server(mine)
    assert mine.returncode == 0, mine.stderr
    theirs = run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(port), WORKER, "a", "b c"], env=env, timeout=120)
    assert theirs.returncode == 0, theirs.stderr
    a, b = _records(mine.stdout), _records(theirs.stdout)
    assert len(a) == 2 and a == b
    assert [r["RANK"] for r in a] == ["0", "1"] and a[0]["MASTER_PORT"] == str(port)
    assert a[0]["name"] == "__main__" and a[0]["argv"] == ["a", "b c"]
    assert a[0]["faults"] == [{"kind": "nan_loss", "steps": [3, 3], "rank": 1}]


def test_a_failing_rank_stops_the_others_and_is_reported():
    t0 = time.monotonic()
    r = _FORKSERVER.launch(2, WORKER, ["--fail"], {"OMP_NUM_THREADS": "1"}, str(REPO),
                           free_port(), timeout=120)
    _require_server(r)
    assert r.returncode == 1
    assert "rank      : 1 (local_rank: 1)\n  exitcode  : 3\n" in r.stderr
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : -15\n" in r.stderr   # SIGTERM
    assert time.monotonic() - t0 < 60          # not the 120 s rank 0 would have slept
