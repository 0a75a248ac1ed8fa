"""benchmarks/acceleration.py's results store: two invocations that share one store (two
1-thread streams on 2 cores) must not lose each other's runs, sweep points or commands."""
import argparse
import copy
import fcntl
import json
import os
import sys
import threading

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import acceleration as acc  # noqa: E402


def run(method, lr, cmd):
    return {"method": method, "lr": lr, "seed": 1234, "steps": 400, "final_eval_loss": 5.0,
            "command": cmd, "curve": []}


def base():
    return {"benchmark": {"steps": 400}, "sweeps": {"cosine": {
        "seed": 1234, "steps": 400, "method": "scratch",
        "results": {"0.002": 5.00, "0.001": 4.95}, "best": 0.001, "bracketed": False}},
        "commands": [{"argv": ["x"], "utc": "t0", "runs": ["scratch_a", "scratch_b"]}],
        "runs": {"scratch_a": run("scratch", 2e-3, 0), "scratch_b": run("scratch", 1e-3, 0)}}


def test_two_invocations_sharing_a_store_keep_everything(tmp_path, monkeypatch):
    # the analysis of these skeletal runs is not under test here (test_acceleration_report)
    monkeypatch.setattr(acc.ar, "analyse_store", lambda store: {})
    a = argparse.Namespace(results=str(tmp_path / "store.json"))
    with open(a.results, "w") as f:
        json.dump(base(), f)
    # both invocations loaded the same store, then registered their own command
    s1, s2 = base(), base()
    s1["commands"].append({"argv": ["A"], "utc": "t1", "runs": []})
    s2["commands"].append({"argv": ["B"], "utc": "t2", "runs": []})
    # A sweeps one more LR (bracketing the optimum) and trains a method
    s1["sweeps"]["cosine"]["results"]["0.0005"] = 5.01
    s1["runs"]["grow_a"] = run("grow", 1e-3, 1)
    s1["commands"][1]["runs"].append("grow_a")
    acc.save_store(a, s1)
    # B, unaware of A's save, trains another method and saves
    s2["runs"]["grow_b"] = run("grow", 1e-3, 1)
    s2["commands"][1]["runs"].append("grow_b")
    acc.save_store(a, s2)
    with open(a.results) as f:
        disk = json.load(f)
    assert set(disk["runs"]) == {"scratch_a", "scratch_b", "grow_a", "grow_b"}
    sw = disk["sweeps"]["cosine"]
    assert sw["results"] == {"0.002": 5.00, "0.001": 4.95, "0.0005": 5.01}
    assert sw["best"] == 0.001 and sw["bracketed"] is True
    cmds = {tuple(c["argv"]): (i, c["runs"]) for i, c in enumerate(disk["commands"])}
    assert cmds[("x",)][1] == ["scratch_a", "scratch_b"]
    assert cmds[("A",)][1] == ["grow_a"] and cmds[("B",)][1] == ["grow_b"]
    # every run points at the command that made it, by its index in the merged list
    assert disk["runs"]["grow_a"]["command"] == cmds[("A",)][0]
    assert disk["runs"]["grow_b"]["command"] == cmds[("B",)][0]
    assert disk["runs"]["scratch_a"]["command"] == cmds[("x",)][0]
    # A saves again later: B's run and command survive, A's command is not duplicated
    s1["runs"]["grow_a2"] = run("grow", 1e-3, 1)
    s1["commands"][[c["argv"] for c in s1["commands"]].index(["A"])]["runs"].append("grow_a2")
    acc.save_store(a, copy.deepcopy(s1))
    with open(a.results) as f:
        disk = json.load(f)
    assert set(disk["runs"]) == {"scratch_a", "scratch_b", "grow_a", "grow_b", "grow_a2"}
    assert [c["argv"] for c in disk["commands"]].count(["A"]) == 1
    assert next(c for c in disk["commands"] if c["argv"] == ["A"])["runs"] == ["grow_a",
                                                                              "grow_a2"]


def test_a_run_another_invocation_is_training_is_waited_for_then_adopted(tmp_path):
    """Two streams that both plan scratch's baseline: the second must not delete the first's
    live run directory (it did, and the first run's curve was lost); it waits for the lock,
    then adopts the finished run without training it again."""
    run_dir = tmp_path / "runs" / "scratch_lr0.001_s1234_n2"
    cfg = {"model": {"layers": 2}, "data": {"prefix": "p"},
           "train": {"steps": 2, "out_dir": str(run_dir)}}
    a = argparse.Namespace(fresh=False, threads=1, keep_checkpoints=False)
    run_dir.mkdir(parents=True)
    (run_dir / "live_file").write_text("the other invocation's checkpoint")
    holder = open(str(run_dir) + ".lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX)           # "the other invocation" is training
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("recs", acc.train(a, "x", cfg, 1)))
    t.start()
    t.join(1.0)
    assert t.is_alive(), "train() did not wait for the run's lock"
    assert (run_dir / "live_file").exists(), "the live run directory was deleted"
    # the other invocation finishes its run, then releases the lock
    with open(run_dir / "bench_config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    rec = {"step": 2, "loss": 5.0, "cum_flops": 1.0, "cum_full_depth_flops": 1.0,
           "wall_s": 1.0, "eval_loss": 4.5}
    (run_dir / "metrics.jsonl").write_text(json.dumps({**rec, "step": 1}) + "\n"
                                           + json.dumps(rec) + "\n")
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    t.join(10.0)
    assert not t.is_alive()
    assert [r["step"] for r in out["recs"]] == [1, 2] and out["recs"][-1]["eval_loss"] == 4.5
    assert (run_dir / "live_file").exists()      # adopted, not retrained
