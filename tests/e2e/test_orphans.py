"""No orphans, no silent hangs, Ctrl-C like SIGTERM (apollo_ds/training/watchdog.py, signals.py),
on real torchrun runs:
- kill -9 of the launcher mid-run: both workers (own sessions, so they receive nothing) are gone
  within 30 s, each saying why;
- a hung peer (SIGSTOP'd rank 1): rank 0 ends within train.dist_timeout_minutes with one line
  naming its rank and the step;
- Ctrl-C delivered to the launcher's process group, as a terminal does: the run finishes the
  step, checkpoints and stops; a second Ctrl-C during that save aborts at once (exit 130) and
  leaves the earlier checkpoint complete and named by `latest`."""
import os
import re
import signal
import subprocess
import time

import psutil

from apollo_ds import rundir
from tests.conftest import PY, REPO, read_metrics
from tests.e2e.helpers import tiny_config, torchrun_cmd

LONG = 5000   # steps: the run must still be going when the test acts


def _env(**extra):
    return dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                **extra)


def _start(cmd, **env):
    # its own session and process group, as a job in a terminal or a batch script
    return subprocess.Popen(cmd, cwd=REPO, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _workers(proc, n=2, timeout=120) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ws = [c for c in psutil.Process(proc.pid).children(recursive=True)
              if "pretrain.py" in " ".join(c.cmdline()) and "torch.distributed" not in
              " ".join(c.cmdline()) and "torchrun" not in " ".join(c.cmdline()[:2])]
        if len(ws) >= n:
            return ws
        time.sleep(0.1)
    raise AssertionError("workers did not start")


def _wait_steps(out, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= n:
            return
        time.sleep(0.2)
    _kill_group(proc)
    raise AssertionError(f"fewer than {n} steps after {timeout} s: {proc.stdout.read()[-3000:]}")


def _kill_group(proc):
    for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _gone_within(procs, seconds) -> float:
    t0 = time.time()
    while time.time() - t0 < seconds:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs):
            return time.time() - t0
        time.sleep(0.25)
    alive = [p.pid for p in procs if p.is_running()]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    raise AssertionError(f"workers {alive} still alive {seconds} s after the launcher died")


def test_workers_exit_when_the_launcher_is_killed(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=LONG)
    proc = _start(torchrun_cmd(cfg, out))
    workers = _workers(proc)
    _wait_steps(out, 2, proc)
    os.kill(proc.pid, signal.SIGKILL)   # the launcher only, as an OOM killer would
    took = _gone_within(workers, 30)
    text = proc.stdout.read()
    assert len(re.findall(r"error: rank \d: the launcher \(pid \d+\) is gone", text)) == 2, \
        text[-3000:]
    assert took < 30


def test_a_hung_peer_ends_the_run_within_the_timeout(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=LONG)
    proc = _start(torchrun_cmd(cfg, out, "train.dist_timeout_minutes=0.25"))
    workers = _workers(proc)
    _wait_steps(out, 2, proc)
    rank1 = next(w for w in workers if w.environ().get("RANK") == "1")
    rank1.suspend()   # SIGSTOP: alive but silent, as a wedged GPU or a stalled node
    t0 = time.time()
    try:
        text, _ = proc.communicate(timeout=120)
    finally:
        for w in workers:
            try:
                w.resume()
                w.kill()
            except psutil.NoSuchProcess:
                pass
    took = time.time() - t0
    m = re.search(r"error: rank 0: no progress in (step \d+|[a-z ]+after step \d+) for "
                  r"[\d.]+ min \(train\.dist_timeout_minutes=0\.25\)", text)
    assert m, text[-3000:]
    assert took < 15 + 60, took   # the timeout, plus torchrun's teardown of the stopped rank


def test_ctrl_c_checkpoints_and_a_second_one_aborts(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=LONG, save_interval=3)
    # every save sleeps 4 s between its files and its manifest: the second Ctrl-C lands there
    proc = _start(torchrun_cmd(cfg, out), APOLLO_DS_FAULT="sleep_save@s=4")
    _workers(proc)
    ckpt = out / rundir.CHECKPOINTS
    deadline = time.time() + 300
    while not (ckpt / rundir.LATEST).exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (ckpt / rundir.LATEST).read_text().strip() == "step_0000003"
    os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C: the terminal signals the foreground group
    # the stop's own save starts sleeping (step 4 or 5 finished), then the second Ctrl-C
    buf = ""
    deadline = time.time() + 120
    while "stopping after" not in buf and "fault: sleep_save" not in buf.split(
            "step_0000003")[-1] and time.time() < deadline:
        buf += proc.stdout.readline()
    workers = _workers(proc, n=2, timeout=5)
    for w in workers:
        w.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    text = buf + text
    assert "SIGINT received twice: aborting now" in text, text[-3000:]
    # the first checkpoint is still the complete one `latest` names
    assert (ckpt / rundir.LATEST).read_text().strip() == "step_0000003"
    assert (ckpt / "step_0000003" / rundir.MANIFEST).exists()
    r = subprocess.run(torchrun_cmd(cfg, out, "train.steps=5"), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "at step 3" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert [rec["step"] for rec in read_metrics(out)] == [1, 2, 3, 4, 5]


def test_ctrl_c_finishes_the_step_and_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path / "run.yaml", corpus, steps=LONG)
    proc = _start(torchrun_cmd(cfg, out))
    _workers(proc)
    _wait_steps(out, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=300)
    m = re.search(r"stopping after step (\d+) \(signal\)", text)
    assert m, text[-3000:]
    k = int(m.group(1))
    assert (out / rundir.CHECKPOINTS / rundir.LATEST).read_text().strip() == rundir.tag_for(k)
    assert [rec["step"] for rec in read_metrics(out)] == list(range(1, k + 1))
    # torchrun itself reports the SIGINT it got with a traceback of its own; the workers none
    assert 'apollo_ds/' not in "".join(ln for ln in text.splitlines(True)
                                        if ln.lstrip().startswith("File ")), text[-3000:]


def test_a_second_signal_of_a_kind_aborts_a_first_does_not():
    code = ("import os, signal, time\n"
            "from apollo_ds.training import signals\n"
            "signals.install()\n"
            "os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.2); assert signals.requested(); print('one stop request', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(5); print('not aborted')\n")
    r = subprocess.run([PY, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "one stop request", r.stdout + r.stderr
    assert r.returncode == 128 + signal.SIGINT
    assert r.stderr.strip().startswith("error: SIGINT received twice: aborting now")
