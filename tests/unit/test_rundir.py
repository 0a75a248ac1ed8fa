"""The run-directory module on real files: the per-parameter reader refuses a cut or swapped
tensor naming the parameter, the file and both shapes, pads only vocabulary rows and slices
the recorded tensor-parallel dim; the run lock refuses a second holder (a real process) naming
it, dies with the holder (kill -9), and a refused run leaves the disk as it was."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from apollo_ds import rundir
from apollo_ds.config import ConfigError


def _write_params(tag_dir, tensors: dict, metas: dict, step: int = 7) -> None:
    d = tag_dir / rundir.PARAMS
    d.mkdir(parents=True)
    for name, t in tensors.items():
        torch.save({"param": t, "exp_avg": t * 2, "exp_avg_sq": t * t}, d / f"{name}.pt")
    (d / rundir.INDEX).write_text(json.dumps({"optimizer_step": step, "vocab_size": 5,
                                              "params": metas}))


@pytest.fixture
def tag(tmp_path):
    emb = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    fc1 = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    _write_params(tmp_path, {"word_embeddings.weight": emb, "pool.0.fc1.weight": fc1},
                  {"word_embeddings.weight": {"shape": [5, 3], "partition_dim": 0,
                                              "vocab_rows": True},
                   "pool.0.fc1.weight": {"shape": [4, 6], "partition_dim": 0,
                                         "vocab_rows": False}})
    return tmp_path, emb, fc1


def test_reader_pads_vocab_rows_and_slices_the_tp_dim(tag):
    tag_dir, emb, fc1 = tag
    r = rundir.ParamReader(str(tag_dir))
    assert r.optimizer_step == 7 and sorted(r.names) == ["pool.0.fc1.weight",
                                                         "word_embeddings.weight"]
    got = r.read("word_embeddings.weight", tp=2, tp_rank=1, padded_rows=8)
    want = torch.cat([emb, torch.zeros(3, 3)])[4:]
    assert torch.equal(got["param"], want) and torch.equal(got["exp_avg"], want * 2)
    assert torch.equal(got["exp_avg_sq"], want * want)
    half = r.read("pool.0.fc1.weight", tp=2, tp_rank=0, expect=(2, 6))
    assert torch.equal(half["param"], fc1[:2])
    flat = r.read("pool.0.fc1.weight", flat=(5, 9), keys=("param",))
    assert list(flat) == ["param"] and flat["param"].tolist() == [5.0, 6.0, 7.0, 8.0]
    # padding is for vocabulary rows only: fc1 comes back as recorded
    assert r.read("pool.0.fc1.weight", padded_rows=8)["param"].shape == (4, 6)


def test_reader_refuses_a_cut_tensor_naming_parameter_file_and_shapes(tag):
    tag_dir, _, fc1 = tag
    path = tag_dir / "params" / "pool.0.fc1.weight.pt"
    torch.save({"param": fc1[:2], "exp_avg": fc1[:2], "exp_avg_sq": fc1[:2]}, path)
    with pytest.raises(ConfigError) as e:
        rundir.ParamReader(str(tag_dir)).read("pool.0.fc1.weight")
    assert str(e.value) == (f"parameter pool.0.fc1.weight: {path} holds param of shape [2, 6] "
                            f"but index.json records [4, 6]; the checkpoint is corrupt: use an "
                            f"older tag")


def test_reader_refuses_a_model_of_another_shape_and_garbage(tag):
    tag_dir, _, _ = tag
    r = rundir.ParamReader(str(tag_dir))
    path = tag_dir / "params" / "pool.0.fc1.weight.pt"
    with pytest.raises(ConfigError) as e:
        r.read("pool.0.fc1.weight", expect=(8, 6))
    assert str(e.value) == (f"parameter pool.0.fc1.weight: {path} gives shape [4, 6] (recorded "
                            f"[4, 6]) but the model's is [8, 6]; the checkpoint was written by "
                            f"another model")
    with pytest.raises(ConfigError, match=r"has 5 vocabulary rows, more than this model's 4"):
        r.read("word_embeddings.weight", padded_rows=4)
    with pytest.raises(ConfigError, match=r"holds no parameter 'pool.9.fc1.weight'"):
        r.read("pool.9.fc1.weight")
    with pytest.raises(ConfigError, match=r"4 entries along its tensor-parallel dim 0, not "
                                          r"divisible by parallel.tp=8"):
        rundir.ParamReader(str(tag_dir)).read("pool.0.fc1.weight", tp=8)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ConfigError, match=r"parameter pool.0.fc1.weight: cannot read .*"
                                          r"incomplete or corrupt"):
        r.read("pool.0.fc1.weight")
    (tag_dir / "params" / "index.json").write_text("{")
    with pytest.raises(ConfigError, match=r"index.json is unreadable \(JSONDecodeError"):
        rundir.ParamReader(str(tag_dir))


def test_candidates_and_resolve(tmp_path):
    ck = tmp_path / "run" / rundir.CHECKPOINTS
    assert rundir.candidates(str(ck)) == ([], None)
    for step in (3, 9, 12):
        (ck / rundir.tag_for(step)).mkdir(parents=True)
        (ck / rundir.tag_for(step) / rundir.RUN_STATE).write_text("{}")
        if step != 12:      # step 12: killed before its manifest
            rundir.write_manifest(str(ck / rundir.tag_for(step)), rundir.tag_for(step))
    rundir.write_latest(str(ck), "step_0000009")
    assert rundir.candidates(str(ck)) == (["step_0000009", "step_0000003"], None)
    assert rundir.resolve(str(tmp_path / "run")) == str(ck / "step_0000009")
    assert rundir.resolve(str(ck), "step_0000003") == str(ck / "step_0000003")
    with pytest.raises(ConfigError, match=r"latest is empty \(complete tags: step_0000009, "
                                          r"step_0000003\); pass a tag directory"):
        rundir.write_latest(str(ck), "")
        rundir.resolve(str(tmp_path / "run"))
    assert rundir.inside_run_dir(str(tmp_path / "run" / "hf" / "x")) == str(tmp_path / "run")
    assert rundir.inside_run_dir(str(tmp_path / "elsewhere")) is None


HOLD = """
import sys, time
from apollo_ds import rundir
rundir.RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_run_lock_one_holder_dies_with_it(tmp_path):
    out = tmp_path / "a" / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__)))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError) as e:
            rundir.RunLock(str(out)).acquire()
        msg = str(e.value)
        assert msg.startswith(f"train.out_dir={out} is in use by another run (pid {holder.pid} "
                              f"on ")
        assert msg.endswith(f"; lock {out / rundir.LOCK}); wait for it to end or choose "
                            f"another train.out_dir")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = rundir.RunLock(str(out)).acquire()        # kill -9 left nothing locked
    assert (out / rundir.LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()


def test_refused_run_leaves_the_disk_as_it_was(tmp_path):
    fresh = tmp_path / "x" / "y" / "run"
    rundir.RunLock(str(fresh)).acquire().release(undo=True)
    assert not (tmp_path / "x").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / rundir.LOCK).write_text("pid 1 on elsewhere, started long ago\n")
    before = os.stat(old / rundir.LOCK).st_size
    lock = rundir.RunLock(str(old)).acquire()
    assert (old / rundir.LOCK).read_text().startswith(f"pid {os.getpid()}")
    lock.release(undo=True)
    assert (old / rundir.LOCK).read_text() == "pid 1 on elsewhere, started long ago\n"
    assert os.stat(old / rundir.LOCK).st_size == before


def test_save_hashed_and_manifest_from_the_writers_checksums(tmp_path):
    """save_hashed reports exactly what hashlib reads back from the file; write_manifest uses
    the given (size, sha256) without reading those files, and hashes any file not given."""
    import hashlib
    d = tmp_path / "step_0000001"
    (d / rundir.PARAMS).mkdir(parents=True)
    t = {"param": torch.arange(12.0).view(3, 4)}
    size, digest = rundir.save_hashed(t, str(d / rundir.PARAMS / "w.pt"))
    raw = (d / rundir.PARAMS / "w.pt").read_bytes()
    assert (size, digest) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert torch.equal(torch.load(d / rundir.PARAMS / "w.pt")["param"], t["param"])
    abc = (3, hashlib.sha256(b"abc").hexdigest())
    assert rundir.save_hashed(b"abc", str(d / "x.bin")) == abc
    assert rundir.file_entry(str(d / "x.bin"), fsync=True) == abc
    rundir.write_run_state(str(d), {"step": 1})
    # a deliberately wrong given entry shows the manifest did not re-read that file
    rundir.write_manifest(str(d), "step_0000001", {"x.bin": (3, "f" * 64),
                                                   "params/w.pt": (size, digest)})
    files = json.loads((d / rundir.MANIFEST).read_text())["files"]
    assert files["x.bin"] == {"size": 3, "sha256": "f" * 64}
    assert files["params/w.pt"] == {"size": size, "sha256": digest}
    state = (d / rundir.RUN_STATE).read_bytes()
    assert files[rundir.RUN_STATE] == {"size": len(state),
                                       "sha256": hashlib.sha256(state).hexdigest()}
    assert sorted(files) == ["params/w.pt", rundir.RUN_STATE, "x.bin"]
    assert rundir.manifest_problem(str(d)) == "x.bin does not match its checksum"
