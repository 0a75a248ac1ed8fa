"""benchmarks/acceleration.py's results store: two invocations that share one store (two
1-thread streams on 2 cores) must not lose each other's runs, sweep points or commands."""
import argparse
import copy
import json
import os
import sys

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
