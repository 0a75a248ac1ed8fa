"""A fork server for the suite's multi-process runs: one process per pytest worker imports
torch, DeepSpeed, megatron-core and apollo_ds once, then forks the ranks of every launch, as
torchrun would start them (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), each running the script as ``__main__``. As under the deepspeed launcher, mpirun
or srun, rank 0 hosts torch.distributed's store on MASTER_PORT (torchrun's agent would).

Why: a rank's interpreter start and imports cost about 4-5 s of CPU, and the torchrun agent
1.5 s more, for runs of a few tiny steps: most of what the distributed tests spent. What a rank
then does is unchanged (same script, same environment, its own process, gloo over TCP).
The launchers themselves (torchrun, deepspeed, mpirun, srun) keep their own end-to-end tests,
which do not use this server.

Protocol, one request per connection over a Unix socket: the client sends one JSON line
{script, args, nproc, env, cwd, stdout, stderr, master_port}; the server answers at once with
{"pid": P} (P leads its own process group: killpg(P) ends the launch), then, when every rank
has ended, {"rc": 0 or 1, "ranks": [exit codes]}. As with torchrun, a failing rank makes the
others get SIGTERM (SIGKILL 30 s later) and the launch return 1.

Run: python -m tests.forkserver SOCKET_PATH (the client in tests/conftest.py does)."""
from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback

GRACE_S = 30.0


def preload() -> None:
    """Import what every rank imports before its first step (a fork shares it)."""
    import torch  # noqa: F401
    from apollo_ds.lazy_compile import import_heavy
    import_heavy()
    import torch._dynamo  # noqa: F401  (every torch optimizer's constructor imports it)
    import apollo_ds.pretrain  # noqa: F401
    import apollo_ds.training.loop  # noqa: F401
    import apollo_ds.distributed  # noqa: F401
    import apollo_ds.preflight  # noqa: F401
    import sentencepiece  # noqa: F401


def _run_rank(req: dict, rank: int) -> int:
    """In the forked rank: become what torchrun would have started, run the script."""
    os.environ.clear()
    os.environ.update(req["env"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0",
                      WORLD_SIZE=str(req["nproc"]), LOCAL_WORLD_SIZE=str(req["nproc"]),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(req["master_port"]))
    os.chdir(req["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(f, fd)
        os.close(f)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch
    torch.set_num_threads(int(req["env"].get("OMP_NUM_THREADS", "1")))
    faults = sys.modules.get("apollo_ds.training.faults")
    if faults is not None:            # it reads APOLLO_DS_FAULT when imported
        importlib.reload(faults)
    script = os.path.abspath(req["script"])
    sys.argv = [script, *req["args"]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _launch(req: dict, conn: socket.socket) -> int:
    """In the launch process (its own process group): fork the ranks, wait, report."""
    os.setpgid(0, 0)
    conn.sendall((json.dumps({"pid": os.getpid()}) + "\n").encode())
    pids = {}
    for rank in range(req["nproc"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            os._exit(_run_rank(req, rank))
        pids[pid] = rank
    codes: list[int | None] = [None] * req["nproc"]
    deadline = None
    while any(c is None for c in codes):
        pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
        if pid == 0:
            if time.monotonic() > deadline:
                for p, r in pids.items():
                    if codes[r] is None:
                        os.kill(p, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.1)
            continue
        if pid not in pids:
            continue
        codes[pids[pid]] = os.waitstatus_to_exitcode(status)
        if codes[pids[pid]] != 0 and deadline is None:   # torchrun: stop the others
            for p, r in pids.items():
                if codes[r] is None:
                    os.kill(p, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
    rc = 0 if all(c == 0 for c in codes) else 1
    conn.sendall((json.dumps({"rc": rc, "ranks": codes}) + "\n").encode())
    return rc


def serve(path: str) -> None:
    parent = os.getppid()
    preload()
    gc.collect()
    gc.freeze()   # the imports' objects: never collected, so forks keep sharing their pages
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:   # forking a process with other threads running is unsafe
        print(f"forkserver: {threads} threads after the imports; not serving", file=sys.stderr)
        sys.exit(3)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path + ".tmp")
    srv.listen(64)
    os.rename(path + ".tmp", path)   # the client waits for this name: it means ready
    srv.settimeout(1.0)
    while os.getppid() == parent:    # the pytest worker that started it is gone: stop
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        with conn, conn.makefile("r") as f:
            req = json.loads(f.readline())
            sys.stdout.flush()
            sys.stderr.flush()
            if os.fork() == 0:
                srv.close()
                try:
                    code = _launch(req, conn)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                os._exit(code)
    if os.path.exists(path):
        os.unlink(path)


class Client:
    """Starts the server on first use (once per pytest worker) and launches through it.
    ``launch`` returns None when the server cannot serve (the caller uses torchrun)."""

    def __init__(self, python: str, repo: str):
        self.python, self.repo = python, repo
        self.proc = None
        self.failed = os.environ.get("APOLLO_TEST_LAUNCHER", "forkserver") != "forkserver"

    def _start(self) -> bool:
        import subprocess
        import tempfile
        d = tempfile.mkdtemp(prefix="apollo_fs_")
        self.path = os.path.join(d, "sock")
        env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(os.path.join(d, "server.log"), "w") as log:
            self.proc = subprocess.Popen([self.python, "-m", "tests.forkserver", self.path],
                                         cwd=self.repo, env=env, stdout=log, stderr=log,
                                         start_new_session=True)
        atexit.register(self._stop, d)
        t0 = time.monotonic()
        while not os.path.exists(self.path):
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                self.proc.kill()
                print(f"forkserver did not start: see {d}/server.log; using torchrun",
                      file=sys.stderr)
                return False
            time.sleep(0.05)
        return True

    def _stop(self, d: str) -> None:
        import shutil
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(d, ignore_errors=True)

    def launch(self, nproc: int, script: str, args: list[str], env: dict, cwd: str,
               master_port: int, timeout: float):
        import subprocess
        import tempfile
        if self.failed:
            return None
        if self.proc is None or self.proc.poll() is not None:
            if not self._start():
                self.failed = True
                return None
        fd_out, out = tempfile.mkstemp(prefix="rank_out_")
        fd_err, err = tempfile.mkstemp(prefix="rank_err_")
        os.close(fd_out)
        os.close(fd_err)
        cmd = ["forkserver", "--nproc_per_node", str(nproc), "--master_port", str(master_port),
               script, *args]
        req = {"script": script, "args": list(args), "nproc": nproc, "env": env, "cwd": cwd,
               "stdout": out, "stderr": err, "master_port": master_port}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.path)
                s.settimeout(timeout)
                s.sendall((json.dumps(req) + "\n").encode())
                f = s.makefile("r")
                pid = json.loads(f.readline())["pid"]
                try:
                    line = f.readline()
                except socket.timeout:
                    os.killpg(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(cmd, timeout)
                if not line:
                    raise RuntimeError(f"forkserver launch {pid} died without a result")
                result = json.loads(line)
            with open(out) as fo, open(err) as fe:
                stdout, stderr = fo.read(), fe.read()
            for rank, code in enumerate(result["ranks"]):   # as torchrun reports a failure
                if code != 0:
                    stderr += (f"forkserver: rank {rank} failed\n  rank      : {rank} "
                               f"(local_rank: {rank})\n  exitcode  : {code}\n")
            return subprocess.CompletedProcess(cmd, result["rc"], stdout, stderr)
        finally:
            os.unlink(out)
            os.unlink(err)


if __name__ == "__main__":
    serve(sys.argv[1])
