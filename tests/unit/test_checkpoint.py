"""Durable checkpoints without a job: a checkpoint is complete only with its manifest, the
newest one that verifies is found, a truncated, altered or missing file sends the search to
the newest older checkpoint (with a warning), and retention keeps the newest K but never the
one ``latest`` names. The state writer is a stand-in that writes files the way portable.write
lays them out; the distributed suite runs the real engine through the same code."""
import json
import os

import pytest

from apollo_ds import rundir
from apollo_ds.config import ConfigError
from apollo_ds.training import checkpoint as ck


MODEL, OPT = f"{rundir.PARAMS}/{rundir.INDEX}", f"{rundir.PARAMS}/rank_00000.bin"


def write_state(tag_dir):
    """Stands in for portable.write: this rank's files, hashed and fsynced as written; their
    (size, sha256) returned for the manifest."""
    out = {}
    for rel, size in ((MODEL, 3000), (OPT, 5000)):
        os.makedirs(os.path.dirname(os.path.join(tag_dir, rel)), exist_ok=True)
        out[rel] = rundir.save_hashed(os.urandom(size), os.path.join(tag_dir, rel))
    return out


def save(tmp_path, step, keep=0):
    return ck.save(str(tmp_path), {"step": step, "n_unique": 1}, 0, write_state, keep=keep)


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    tag = save(tmp_path, 5)
    man = json.loads((tmp_path / tag / rundir.MANIFEST).read_text())
    assert sorted(man["files"]) == sorted([MODEL, rundir.RUN_STATE, OPT])
    assert man["files"][MODEL]["size"] == 3000
    assert man["files"][OPT]["sha256"] == rundir.sha256(str(tmp_path / tag / OPT))
    assert (tmp_path / rundir.LATEST).read_text() == "step_0000005"
    assert ck.verify(str(tmp_path / tag)) is None
    assert ck.find_latest(str(tmp_path)) == ("step_0000005", {"step": 5, "n_unique": 1})


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_damaged_newest_falls_back_to_older(damage, tmp_path, capsys):
    save(tmp_path, 5)
    save(tmp_path, 10)
    bad = tmp_path / "step_0000010"
    opt = bad / OPT
    if damage == "truncate":
        opt.write_bytes(opt.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(opt.read_bytes())
        data[7] ^= 0xFF
        opt.write_bytes(bytes(data))
    elif damage == "delete":
        opt.unlink()
    else:   # killed before the manifest (and so before `latest`) was written
        (bad / rundir.MANIFEST).unlink()
        (bad / rundir.RUN_STATE).unlink()
    assert ck.find_latest(str(tmp_path))[0] == "step_0000005"
    if damage != "no_manifest":
        assert "step_0000010 is corrupt or truncated" in capsys.readouterr().err


def test_nothing_valid_is_refused_with_the_fix(tmp_path):
    save(tmp_path, 5)
    (tmp_path / "step_0000005" / MODEL).write_bytes(b"")
    with pytest.raises(ConfigError, match="no valid checkpoint.*move .* away"):
        ck.find_latest(str(tmp_path))


def test_keep_newest_k_never_the_latest(tmp_path):
    for s in (5, 10, 15, 20):
        save(tmp_path, s, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000015", "step_0000020"]
    # `latest` pointing at an older tag (as after a fallback) protects that tag
    (tmp_path / rundir.LATEST).write_text("step_0000015")
    assert rundir.prune(str(tmp_path), 1) == []
    save(tmp_path, 25, keep=1)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_0000025"]


def test_fresh_directory_has_no_checkpoint(tmp_path):
    assert ck.find_latest(str(tmp_path / "none")) is None


@pytest.mark.parametrize("latest", ["", "garbage", "step_0000099"])
def test_unusable_latest_names_the_complete_tags_and_falls_back(latest, tmp_path, capsys):
    save(tmp_path, 5)
    save(tmp_path, 10)
    (tmp_path / rundir.LATEST).write_text(latest)
    assert ck.find_latest(str(tmp_path)) == ("step_0000010", {"step": 10, "n_unique": 1})
    err = capsys.readouterr().err
    what = "is empty" if not latest else f"names '{latest}', which is not a checkpoint here"
    assert err == (f"warning: {tmp_path / rundir.LATEST} {what}; the complete checkpoints are "
                   f"step_0000010, step_0000005; resuming from the newest one that verifies\n")


def test_no_valid_checkpoint_lists_each_tag_and_what_is_wrong(tmp_path, capsys):
    save(tmp_path, 5)
    save(tmp_path, 10)
    (tmp_path / rundir.LATEST).write_text("")
    for tag in ("step_0000005", "step_0000010"):
        (tmp_path / tag / MODEL).write_bytes(b"x")
    with pytest.raises(ConfigError) as e:
        ck.find_latest(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"no valid checkpoint in {tmp_path} ({tmp_path / rundir.LATEST} is "
                          f"empty; the complete checkpoints are step_0000010, step_0000005; ")
    assert (f"step_0000010: {MODEL} has 1 bytes, the manifest says 3000; "
            f"step_0000005: {MODEL} has 1 bytes") in msg


def test_rewriting_an_unnamed_tag_leaves_no_file_of_the_earlier_write(tmp_path):
    """A killed run completed step 10 without naming it in ``latest`` (or left it half
    written): saving step 10 again starts from an empty tag directory, so no rank file of
    another layout (rank_00003.bin of a wider run, say) stays behind in the manifest."""
    save(tmp_path, 5)
    save(tmp_path, 10)
    (tmp_path / rundir.LATEST).write_text("step_0000005")
    stale = tmp_path / "step_0000010" / rundir.PARAMS / "rank_00003.bin"
    stale.write_bytes(b"old layout")
    save(tmp_path, 10)
    man = json.loads((tmp_path / "step_0000010" / rundir.MANIFEST).read_text())
    assert sorted(man["files"]) == sorted([MODEL, rundir.RUN_STATE, OPT])
    assert not stale.exists()
