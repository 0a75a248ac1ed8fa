"""A single process started without a launcher and without MASTER_PORT rendezvouses on a free
port of its own instead of torch's fixed 29500 (which another job may hold: here the test
holds it). A given MASTER_PORT is honoured as before (the launcher tests pass one)."""
import os
import socket
import subprocess
import sys

from tests.conftest import REPO

PROBE = ("from apollo_ds import distributed; import os; d = distributed.init(); "
         "print('port', os.environ['MASTER_PORT'], 'world', d.world, flush=True); "
         "distributed.shutdown()")


def _start(**env):
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                         "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True,
                          text=True, timeout=300,
                          env=dict(base, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env))


def test_single_process_without_master_port_takes_a_free_port():
    busy = socket.socket()
    try:
        busy.bind(("", 29500))
        busy.listen(1)
    except OSError:
        pass          # already held by someone else: the same situation
    try:
        r = _start()
        assert r.returncode == 0, r.stderr[-3000:]
        line = [x for x in r.stdout.splitlines() if x.startswith("port ")][-1].split()
        assert line[3] == "1" and line[1] != "29500", line
    finally:
        busy.close()
