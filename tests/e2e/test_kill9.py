"""kill -9 trials: a 2-process torchrun run (tiny model, an Apollo expansion 1 -> 2 after step
8, a checkpoint every 2 steps) is killed with SIGKILL (torchrun and every worker, all their
process groups at once, as a node failure or the OOM killer would) at points taken from the
run's own progress: during a step (a random moment after a new step line), during a save (a
random moment after the test-only hook announces a save's pause between the engine files and
the manifest, or just after it) and during an expansion (likewise, between the old engine's
teardown and the new one's build). The same command is rerun after every kill until it
finishes; the per-step losses must equal an uninterrupted run's and metrics.jsonl must hold
every step exactly once. No process of a killed run may survive (none holds its port)."""
import json
import os
import queue
import random
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from apollo_ds import rundir
from tests.conftest import read_metrics, write_config
from tests.e2e.helpers import REPO, TINY_MODEL, torchrun_cmd, train_losses

STEPS, EXPAND_AFTER = 16, 8
PAUSE = {"save": 0.4, "expand": 0.6}
FAULT = f"sleep_save@s={PAUSE['save']},sleep_expand@s={PAUSE['expand']}"


def _env(fault: bool) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("APOLLO_DS_FAULT", None)
    if fault:
        env["APOLLO_DS_FAULT"] = FAULT
    return env


def _apollo_config(tmp_path, corpus, name):
    return write_config(tmp_path / f"{name}.yaml", corpus, model=TINY_MODEL,
                        apollo={"enabled": True, "stages": [1, 2],
                                "stage_ends": [EXPAND_AFTER]},
                        train={"steps": STEPS, "micro_batch": 2, "global_batch": 8,
                               "eval_iters": 2, "log_interval": 1, "save_interval": 2})


class Attempt:
    """One launch of the command: torchrun in its own session, stdout read line by line."""

    def __init__(self, cmd, fault: bool):
        self.port = int(cmd[cmd.index("--master_port") + 1])
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(fault), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.text: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 300) -> str | None:
        """The first line starting with ``prefix``; None if the run ended before one."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return None
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no '{prefix}' line in {timeout}s:\n{''.join(self.text)[-3000:]}")

    def kill9(self) -> None:
        """SIGKILL to torchrun's process group and to every worker's (torchrun starts each
        worker in a session of its own), then check that nothing survives."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        groups = set()
        for p in procs:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        for g in groups:
            try:
                os.killpg(g, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, f"survivors of kill -9: {alive}"
        with socket.socket() as s:   # the rendezvous port is free again
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))


def _resume_point(out) -> tuple[int, int]:
    """(step, pool size) of the checkpoint a rerun resumes from ((0, 1) for none)."""
    latest = out / rundir.CHECKPOINTS / rundir.LATEST
    if not latest.exists():
        return 0, 1
    st = json.loads((out / rundir.CHECKPOINTS / latest.read_text().strip() / rundir.RUN_STATE)
                    .read_text())
    return st["step"], st["n_unique"]


def _trial(corpus, tmp_path, kinds: list[str], seed: int):
    rng = random.Random(seed)
    ref_cfg = _apollo_config(tmp_path, corpus, "straight")
    r = subprocess.run(torchrun_cmd(ref_cfg, tmp_path / "straight"), cwd=REPO,
                       env=_env(False), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    reference = train_losses(tmp_path / "straight")
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))

    out = tmp_path / "run"
    cfg = _apollo_config(tmp_path, corpus, "run")
    done, log = [], []
    for want in kinds:
        step0, n_unique = _resume_point(out)
        kind = want if want != "expand" or n_unique == 1 else "step"
        a = Attempt(torchrun_cmd(cfg, out), fault=True)
        if kind == "step":   # a random moment after the first new step of this launch
            line = a.wait_for("step ")
            delay = rng.uniform(0.0, 0.5)
        else:                # mostly inside the announced pause, else just after it
            line = a.wait_for(f"fault: sleep_{kind}")
            p = PAUSE[kind]
            delay = rng.uniform(0.0, p) if rng.random() < 0.7 else rng.uniform(p, p + 0.3)
        assert line, f"launch ended before a {kind} kill point (resumed at {step0}):\n" \
                     f"{''.join(a.text)[-3000:]}"
        time.sleep(delay)
        a.kill9()
        done.append(kind)
        log.append(f"{kind} kill at +{delay:.2f}s (from step {step0}; reached "
                   f"{_resume_point(out)[0]})")
        inside = delay < PAUSE.get(kind, 0) - 0.15   # surely before the pause ended
        if inside:
            done.append(f"{kind} inside")
        text = "".join(a.text)
        if kind == "save" and inside:   # the engine files are there, the manifest is not
            tag = out / rundir.CHECKPOINTS / line.split()[-1]
            assert tag.is_dir() and not (tag / rundir.MANIFEST).exists(), log
            assert (out / rundir.CHECKPOINTS / rundir.LATEST).read_text().strip() != tag.name, log
        if kind == "expand" and inside:
            assert "expanded pool" not in text, log
    print("\n".join(log))
    a = Attempt(torchrun_cmd(cfg, out), fault=True)
    a.proc.wait(timeout=900)
    a.reader.join(timeout=60)
    text = "".join(a.text)
    assert a.proc.returncode == 0, f"seed {seed}, {log}:\n{text[-4000:]}"
    steps = [rec["step"] for rec in read_metrics(out) if rec.get("kind", "train") == "train"]
    assert steps == list(range(1, STEPS + 1)), f"seed {seed}, {log}: {steps}"
    got = train_losses(out)
    for (s, x), (_, y) in zip(got, reference):
        assert x == pytest.approx(y, rel=1e-5), f"seed {seed}, {log}: step {s}"
    return done


def test_kill9_five_times_resumes_exactly(corpus, tmp_path):
    done = _trial(corpus, tmp_path, ["step", "save", "expand", "step", "save"], seed=7)
    assert done.count("step") + done.count("save") + done.count("expand") == 5
    assert {"step", "save", "expand", "save inside", "expand inside"} <= set(done), done


@pytest.mark.slow
def test_kill9_twenty_times_resumes_exactly(corpus, tmp_path):
    rng = random.Random(20)
    kinds = ["expand", "save", "step"] + [rng.choice(["step", "save", "expand"])
                                          for _ in range(17)]
    done = _trial(corpus, tmp_path, kinds, seed=20)
    assert done.count("step") + done.count("save") + done.count("expand") == 20
    assert {"step", "save", "expand", "save inside"} <= set(done), done
