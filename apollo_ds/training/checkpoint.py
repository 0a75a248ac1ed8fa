"""Checkpoints: the model and optimizer state as per-rank fragment files (portable.py: each rank
writes what it owns; DeepSpeed's own files are not written) plus the run's own state (step,
consumed samples, pool size, stage) in ``run_state.json``, made durable:

- every rank writes, checksums and fsyncs its own file as it writes it; once every rank is
  done (the checksums all-gathered) rank 0 fsyncs the directories, writes
  ``run_state.json`` and ``manifest.json`` (every file's size and sha256, from those
  checksums) and only then replaces ``latest`` atomically (and fsyncs its directory);
- on resume the newest checkpoint is verified against its manifest (sizes on every rank, the
  checksums split over the ranks, the verdict agreed); a truncated or corrupt one is passed over
  with a warning for the newest older one that verifies;
- ``train.keep_checkpoints: K`` (> 0) keeps the newest K complete checkpoints, never the one
  ``latest`` names.
So a run killed at any point resumes from the last checkpoint that was completely written, and
nothing written before is lost. File names, tags, ``latest`` and the manifest: apollo_ds.rundir."""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

from apollo_ds import rundir
from apollo_ds.config import ConfigError
from apollo_ds.training import faults


def _world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _agree_any(flag: bool) -> bool:
    if not torch.distributed.is_initialized():
        return flag
    from apollo_ds.distributed import all_reduce
    return all_reduce([float(flag)], op="max").tolist()[0] > 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class WriteError(OSError):
    """A write phase of a save failed on some rank (``own``: this one; ``cause`` its error).
    Raised on every rank together, before the manifest and ``latest``: nothing earlier moves."""

    def __init__(self, cause: OSError | None):
        super().__init__(*(cause.args if cause else ("failed on another rank",)))
        self.own, self.cause = cause is not None, cause
        self.filename = getattr(cause, "filename", None)


def _phase(fn):
    """Run one write phase (returns what ``fn`` returns); an OSError on any rank (full disk,
    permissions) ends the save on all of them at the same point, so none waits in a
    collective the others never reach."""
    err, out = None, None
    try:
        out = fn()
    except OSError as e:
        err = e
    if _agree_any(err is not None):
        raise WriteError(err)
    return out


TIMES: dict[str, float] = {}   # this rank's seconds per phase of the last save (profiling)


def _timed(name: str, t0: float) -> float:
    now = time.perf_counter()
    TIMES[name] = now - t0
    return now


def save(ckpt_dir: str, run_state: dict, rank: int, write_state, keep: int = 0) -> str:
    """``write_state(tag_dir)`` (collective: the model and optimizer state, portable.write;
    it returns {relative path: (size, sha256)} of the files this rank wrote and fsynced), then
    run_state.json, manifest.json (from the ranks' checksums, nothing re-read) and
    ``latest``, in that order. DeepSpeed's own files are not written (the fragments are the
    one copy, read back by every resume)."""
    tag = rundir.tag_for(run_state["step"])
    tag_dir = os.path.join(ckpt_dir, tag)
    _, world = _world()
    if rank == 0 and os.path.isdir(tag_dir) and tag != rundir.read_latest(ckpt_dir):
        # a killed run left this tag (completed or not) but never named it in `latest`:
        # rewriting it, it is incomplete again until the new manifest (the manifest goes
        # first), and no file of another layout's ranks stays behind
        if rundir.has_manifest(tag_dir):
            os.remove(os.path.join(tag_dir, rundir.MANIFEST))
        shutil.rmtree(tag_dir, ignore_errors=True)
    _barrier()
    TIMES.clear()
    t = time.perf_counter()

    def state_files():
        os.makedirs(tag_dir, exist_ok=True)
        out = write_state(tag_dir)
        faults.disk_full(run_state["step"], tag_dir)   # test-only: a full disk mid-save
        return out
    known = dict(_phase(state_files) or {})
    t = _timed("state_files", t)
    everyone = [known]
    if torch.distributed.is_initialized() and world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, known)   # also: every rank is done
    known = {rel: e for part in everyone for rel, e in part.items()}
    faults.sleep("save", tag)   # test-only: a kill -9 aimed between the files and the manifest
    _barrier()
    if rank == 0:
        for root, _dirs, _names in os.walk(tag_dir):   # the directory entries
            rundir.fsync_dir(root)
        rundir.write_run_state(tag_dir, run_state)
        rundir.write_manifest(tag_dir, tag, known)
        t = _timed("manifest", t)
        rundir.write_latest(ckpt_dir, tag)
        if keep > 0:
            rundir.prune(ckpt_dir, keep)
    _barrier()
    _timed("end", t)
    if os.environ.get("APOLLO_SAVE_PROFILE"):   # a file: each rank appends its split
        with open(os.environ["APOLLO_SAVE_PROFILE"], "a") as f:
            f.write(json.dumps({"rank": rank, **TIMES}) + "\n")
    return tag


def verify(tag_dir: str) -> str | None:
    """None when the tag directory matches its manifest, else what is wrong. Sizes are checked
    on every rank; the checksums are split over the ranks and the verdict is agreed
    (collective when a process group exists)."""
    problem = rundir.manifest_problem(tag_dir, share=_world())
    bad = _agree_any(problem is not None)
    if bad and problem is None:
        problem = "another rank found a file that does not match the manifest"
    return problem


def find_latest(ckpt_dir: str) -> tuple[str, dict] | None:
    """(tag, run_state) of the newest checkpoint that verifies, or None for a fresh run. A
    corrupt or truncated newest checkpoint (or an unusable ``latest``) is passed over, with a
    warning naming the complete tags, for the newest older one that verifies."""
    tags, note = rundir.candidates(ckpt_dir)
    if not tags and note is None:
        return None
    rank, _ = _world()
    if note and rank == 0:
        print(f"warning: {note}; resuming from the newest one that verifies", file=sys.stderr,
              flush=True)
    problems = []
    for tag in tags:
        tag_dir = os.path.join(ckpt_dir, tag)
        problem = verify(tag_dir)
        if problem is None:
            return tag, rundir.read_run_state(tag_dir)
        problems.append(f"{tag}: {problem}")
        if rank == 0:
            print(f"warning: checkpoint {tag_dir} is corrupt or truncated ({problem}); falling "
                  f"back to the newest older checkpoint ({rundir.describe_complete(ckpt_dir)})",
                  file=sys.stderr, flush=True)
    head = note or f"{rundir.LATEST} names {rundir.read_latest(ckpt_dir)}"
    raise ConfigError(f"no valid checkpoint in {ckpt_dir} ({head}; "
                      f"{'; '.join(problems) or 'nothing to try'}; no older checkpoint verifies "
                      f"against its {rundir.MANIFEST}); move {ckpt_dir} away to start fresh")


def load(engine, ckpt_dir: str, tag: str) -> None:
    """A checkpoint written before the fragment format, under the layout that wrote it:
    through DeepSpeed's own files."""
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
