"""Checkpoints: DeepSpeed's engine checkpoint (model, optimizer partitions) plus the run's own
state (step, consumed samples, pool size, stage) in ``run_state.json``, made durable:

- every rank fsyncs the tag directory's files after DeepSpeed wrote them; after a barrier rank 0
  writes ``run_state.json`` and ``manifest.json`` (every file's size and sha256), fsyncs the
  directory, and only then replaces ``latest`` atomically (and fsyncs its directory);
- on resume the newest checkpoint is verified against its manifest (sizes on every rank, the
  checksums split over the ranks, the verdict agreed); a truncated or corrupt one is passed over
  with a warning for the newest older one that verifies;
- ``train.keep_checkpoints: K`` (> 0) keeps the newest K complete checkpoints, never the one
  ``latest`` names.
So a run killed at any point resumes from the last checkpoint that was completely written, and
nothing written before is lost."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import torch

from apollo_ds.config import ConfigError
from apollo_ds.training import faults

RUN_STATE = "run_state.json"
LATEST = "latest"
MANIFEST = "manifest.json"
_TAG = re.compile(r"^step_(\d{7,})$")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def _files(tag_dir: str) -> list[str]:
    """Relative paths of the tag directory's files (the manifest itself excluded)."""
    out = []
    for root, _dirs, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel != MANIFEST and ".tmp." not in n:
                out.append(rel)
    return sorted(out)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tag directories that hold a manifest (written last), newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if _TAG.match(t) and os.path.isfile(os.path.join(ckpt_dir, t, MANIFEST))]
    return sorted(tags, reverse=True)


def save(engine, ckpt_dir: str, run_state: dict, rank: int, keep: int = 0,
         write_extra=None) -> str:
    """DeepSpeed's files, then ``write_extra(tag_dir)`` (collective: the layout-free state),
    then fsync, run_state.json, manifest.json and ``latest``, in that order."""
    tag = tag_for(run_state["step"])
    tag_dir = os.path.join(ckpt_dir, tag)
    stale = os.path.join(tag_dir, MANIFEST)
    if rank == 0 and os.path.exists(stale) and tag != _read_latest(ckpt_dir):
        # a killed run completed this tag but never named it in `latest`: rewriting it, it is
        # incomplete again until the new manifest (a kill now must not leave the old one)
        os.remove(stale)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"apollo_run_state": run_state},
                           save_latest=False)
    if write_extra is not None:
        write_extra(tag_dir)
    _barrier()      # every writer done before anyone lists the files to fsync
    # Each rank flushes what it (and anyone) wrote: on a shared file system fsync must come
    # from the writer, and every rank's own files are among these.
    for rel in _files(tag_dir):
        with open(os.path.join(tag_dir, rel), "rb") as f:
            os.fsync(f.fileno())
    for root, _dirs, _names in os.walk(tag_dir):   # and the directory entries
        _fsync_dir(root)
    faults.sleep("save", tag)   # test-only: a kill -9 aimed between the files and the manifest
    _barrier()
    if rank == 0:
        _atomic_write(os.path.join(tag_dir, RUN_STATE), json.dumps(run_state, indent=1))
        files = {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)),
                       "sha256": _sha256(os.path.join(tag_dir, rel))}
                 for rel in _files(tag_dir)}
        _atomic_write(os.path.join(tag_dir, MANIFEST),
                      json.dumps({"tag": tag, "files": files}, indent=1))
        _atomic_write(os.path.join(ckpt_dir, LATEST), tag)
        if keep > 0:
            prune(ckpt_dir, keep)
    _barrier()
    return tag


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints; never the one ``latest``
    names. Returns the deleted tags."""
    latest = _read_latest(ckpt_dir)
    doomed = [t for t in complete_tags(ckpt_dir)[keep:] if t != latest]
    for t in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return doomed


def _read_latest(ckpt_dir: str) -> str | None:
    marker = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker) as f:
        return f.read().strip()


def verify(tag_dir: str) -> str | None:
    """None when the tag directory matches its manifest, else what is wrong. Sizes are checked
    on every rank; the checksums are split over the ranks and the verdict is agreed
    (collective when a process group exists)."""
    rank, world = _world()
    problem = None
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as f:
            files = json.load(f)["files"]
        with open(os.path.join(tag_dir, RUN_STATE)) as f:
            json.load(f)
    except (OSError, ValueError, KeyError) as e:
        problem = f"manifest or run state unreadable ({e})"
        files = {}
    for i, (rel, meta) in enumerate(sorted(files.items())):
        if problem:
            break
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            problem = f"{rel} is missing"
        elif os.path.getsize(path) != meta["size"]:
            problem = f"{rel} has {os.path.getsize(path)} bytes, the manifest says {meta['size']}"
        elif i % world == rank and _sha256(path) != meta["sha256"]:
            problem = f"{rel} does not match its checksum"
    bad = _agree_any(problem is not None)
    if bad and problem is None:
        problem = "another rank found a file that does not match the manifest"
    return problem


def find_latest(ckpt_dir: str) -> tuple[str, dict] | None:
    """(tag, run_state) of the newest checkpoint that verifies, or None for a fresh run. A
    corrupt or truncated newest checkpoint is passed over, with a warning, for the newest older
    one that verifies."""
    latest = _read_latest(ckpt_dir)
    if latest is None:
        return None
    rank, _ = _world()
    candidates = [latest] + [t for t in complete_tags(ckpt_dir) if t < latest]
    if not os.path.isfile(os.path.join(ckpt_dir, latest, MANIFEST)):
        # written before checkpoints had manifests: trust it as before
        try:
            with open(os.path.join(ckpt_dir, latest, RUN_STATE)) as f:
                return latest, json.load(f)
        except (OSError, ValueError) as e:
            candidates = candidates[1:]
            if rank == 0:
                print(f"warning: checkpoint {os.path.join(ckpt_dir, latest)} is incomplete "
                      f"({e}); looking for an older one", file=sys.stderr, flush=True)
    for tag in dict.fromkeys(candidates):
        problem = verify(os.path.join(ckpt_dir, tag))
        if problem is None:
            with open(os.path.join(ckpt_dir, tag, RUN_STATE)) as f:
                return tag, json.load(f)
        if rank == 0:
            print(f"warning: checkpoint {os.path.join(ckpt_dir, tag)} is corrupt or truncated "
                  f"({problem}); falling back to the newest older checkpoint",
                  file=sys.stderr, flush=True)
    raise ConfigError(f"no valid checkpoint in {ckpt_dir} ({LATEST} names {latest}, and no "
                      f"older checkpoint verifies against its {MANIFEST}); move {ckpt_dir} "
                      f"away to start fresh")


def load(engine, ckpt_dir: str, tag: str) -> None:
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
