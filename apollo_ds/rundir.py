"""The run directory, in one place: what lives where under ``train.out_dir`` and how each piece is
read and written. No DeepSpeed, no process groups, no model: the trainer, the preflight checks,
the exporter and eval/generate all go through it.

    OUT_DIR/run.lock                        advisory lock of the live run (RunLock)
    OUT_DIR/checkpoints/latest              the newest complete tag (atomically replaced)
    OUT_DIR/checkpoints/step_NNNNNNN/       one checkpoint ("tag")
        run_state.json                      the run's own state and settings
        manifest.json                       every other file's size and sha256 (written last)
        params/index.json                   the state's index: full shapes, TP dims, step,
                                            where each rank's fragments lie (no tensor data)
        params/rank_NNNNN.bin               what rank N owns: fp32 masters and Adam moments
                                            (apollo_ds.param_store; the only model state)
    (written before the fragment format: params/<canonical name>.pt with full tensors, plus
    DeepSpeed's own files; still read)

A tag is complete once its manifest exists; ``latest`` only ever names a complete tag."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time

from apollo_ds.config import ConfigError
from apollo_ds.param_store import IndexedParams

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RUN_STATE = "run_state.json"
MANIFEST = "manifest.json"
PARAMS = "params"
INDEX = "index.json"
LOCK = "run.lock"
MOMENTS = ("param", "exp_avg", "exp_avg_sq")
_TAG = re.compile(r"^step_(\d{7,})$")


# ------------------------------------------------------------------ names and small writes
def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, CHECKPOINTS)


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def is_tag(name: str) -> bool:
    return bool(_TAG.match(name or ""))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, text: str) -> None:
    """Write, fsync, rename over ``path`` and fsync its directory: a reader sees the old text
    or the new one, never a part."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ latest, tags, candidates
def read_latest(ckpt_dir: str) -> str | None:
    """What ``latest`` says (stripped; "" when empty), or None when there is no ``latest``."""
    marker = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return f.read().strip()


def write_latest(ckpt_dir: str, tag: str) -> None:
    atomic_write(os.path.join(ckpt_dir, LATEST), tag)


def complete_tags(ckpt_dir: str) -> list[str]:
    """Tag directories that hold a manifest (written last), newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir)
            if is_tag(t) and os.path.isfile(os.path.join(ckpt_dir, t, MANIFEST))]
    return sorted(tags, reverse=True)


def candidates(ckpt_dir: str) -> tuple[list[str], str | None]:
    """(tags to try, newest first; a note when ``latest`` itself is unusable). ``latest`` and
    the complete tags older than it; when ``latest`` is empty or names no tag directory, every
    complete tag. No ``latest``: a fresh run, ([], None)."""
    latest = read_latest(ckpt_dir)
    if latest is None:
        return [], None
    complete = complete_tags(ckpt_dir)
    if is_tag(latest) and os.path.isdir(os.path.join(ckpt_dir, latest)):
        return list(dict.fromkeys([latest] + [t for t in complete if t < latest])), None
    what = "is empty" if not latest else f"names {latest!r}, which is not a checkpoint here"
    have = (f"the complete checkpoints are {', '.join(complete)}" if complete else
            "no checkpoint is complete")
    return complete, f"{os.path.join(ckpt_dir, LATEST)} {what}; {have}"


def describe_complete(ckpt_dir: str) -> str:
    tags = complete_tags(ckpt_dir)
    return f"complete tags: {', '.join(tags)}" if tags else "no tag is complete"


# ------------------------------------------------------------------ run state and manifest
def read_run_state(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, RUN_STATE)) as f:
        return json.load(f)


def write_run_state(tag_dir: str, state: dict) -> None:
    atomic_write(os.path.join(tag_dir, RUN_STATE), json.dumps(state, indent=1))


def tag_files(tag_dir: str) -> list[str]:
    """Relative paths of the tag directory's files (the manifest and temporaries excluded)."""
    out = []
    for root, _dirs, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel != MANIFEST and ".tmp" not in n:
                out.append(rel)
    return sorted(out)


def write_manifest(tag_dir: str, tag: str, known: dict | None = None) -> None:
    """The manifest of every file of the tag directory; ``known``: {relative path: (size,
    sha256)} the writers computed as they wrote (used as given, not re-read); any other file
    is read and hashed here."""
    known = known or {}

    def entry(rel: str) -> dict:
        if rel in known:
            size, digest = known[rel]
        else:
            size, digest = (os.path.getsize(os.path.join(tag_dir, rel)),
                            sha256(os.path.join(tag_dir, rel)))
        return {"size": int(size), "sha256": digest}
    files = {rel: entry(rel) for rel in tag_files(tag_dir)}
    atomic_write(os.path.join(tag_dir, MANIFEST), json.dumps({"tag": tag, "files": files},
                                                             indent=1))


def file_entry(path: str, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file, read once; ``fsync``: flushed to disk through the same open
    (on a local file system any process's fsync flushes the file; on a shared one the
    writer's close already sent it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        size = f.tell()
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


class _Hashing:
    """A file object that hashes and counts what passes through it on the way to ``f``."""

    def __init__(self, f):
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def save_hashed(obj, path: str, **save_kwargs) -> tuple[int, str]:
    """Write ``obj`` (bytes, a function that writes into the file object it is given, or
    anything torch.save takes, with ``save_kwargs``) to ``path`` through a temporary, fsynced
    before the rename; (size, sha256) computed on the way out, so the manifest never reads
    the file again."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        w = _Hashing(f)
        if isinstance(obj, bytes):
            w.write(obj)
        elif callable(obj):
            obj(w)
        else:
            import torch
            torch.save(obj, w, **save_kwargs)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return w.size, w.h.hexdigest()


def has_manifest(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, MANIFEST))


def manifest_problem(tag_dir: str, share: tuple[int, int] | None = (0, 1)) -> str | None:
    """None when the tag directory matches its manifest, else what is wrong. Sizes of every
    file are checked; checksums of the files whose index i has i % share[1] == share[0] (a
    rank's share), none when ``share`` is None. A tag without a manifest (written before
    checkpoints had one) only needs a readable run state."""
    try:
        read_run_state(tag_dir)
    except (OSError, ValueError) as e:
        return f"{RUN_STATE} unreadable ({e})"
    if not has_manifest(tag_dir):
        return None
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as f:
            files = json.load(f)["files"]
        items = sorted((rel, int(m["size"]), m["sha256"]) for rel, m in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for i, (rel, size, digest) in enumerate(items):
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, the manifest says {size}"
        if share is not None and i % share[1] == share[0] and sha256(path) != digest:
            return f"{rel} does not match its checksum"
    return None


def prune(ckpt_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints; never the one ``latest``
    names. Returns the deleted tags."""
    latest = read_latest(ckpt_dir)
    doomed = [t for t in complete_tags(ckpt_dir)[keep:] if t != latest]
    for t in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    return doomed


# ------------------------------------------------------------------ finding a checkpoint
def resolve(path: str, tag: str | None = None) -> str:
    """The tag directory meant by a run's out_dir, its checkpoints/ directory or a tag
    directory (``latest`` picks the tag unless ``tag`` is given). Anything else lying in a run
    directory (an export, say) is never picked. ConfigError says what is missing."""
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint path {path} does not exist; give a run's train.out_dir, "
                          f"its {CHECKPOINTS}/ directory or one checkpoint tag directory")
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint path {path} is not a directory; give a run's "
                          f"train.out_dir, its {CHECKPOINTS}/ directory or a tag directory")
    if tag is None and os.path.isfile(os.path.join(path, RUN_STATE)):
        return os.path.abspath(path)
    ckpt = path
    if not os.path.exists(os.path.join(path, LATEST)) and os.path.isdir(checkpoints_dir(path)):
        ckpt = checkpoints_dir(path)
    if tag is None:
        latest = read_latest(ckpt)
        if latest is None:
            tags = sorted(d for d in os.listdir(ckpt) if is_tag(d))
            hint = (f" (tag directories there: {', '.join(tags[-5:])}; pass one of them, "
                    f"or --tag)" if tags else "")
            raise ConfigError(f"no `{LATEST}` file in {ckpt}: not a checkpoint directory, or "
                              f"no checkpoint was completed yet{hint}")
        if not latest:
            raise ConfigError(f"{os.path.join(ckpt, LATEST)} is empty ({describe_complete(ckpt)})"
                              f"; pass a tag directory instead")
        tag = latest
    tag_dir = os.path.join(ckpt, tag)
    if not os.path.isdir(tag_dir):
        raise ConfigError(f"checkpoint tag {tag} is missing: no directory {tag_dir} "
                          f"({describe_complete(ckpt)})")
    return os.path.abspath(tag_dir)


def open_checkpoint(path: str, tag: str | None = None) -> tuple[str, dict]:
    """(tag directory, run_state) of a complete checkpoint with a layout-free params/ copy, for
    readers outside training (export, eval, generate): ``resolve``, then every file of the
    manifest there with its size (checksums are the resume's: reading everything twice would
    double the I/O), then a run state that names the model."""
    tag_dir = resolve(path, tag)
    problem = manifest_problem(tag_dir, share=None)
    if problem is not None:
        raise ConfigError(f"checkpoint {tag_dir} is incomplete or corrupt: {problem}; use an "
                          f"older tag (pass its directory)")
    state = read_run_state(tag_dir)
    for key in ("n_unique", "model"):
        if key not in state:
            raise ConfigError(f"{os.path.join(tag_dir, RUN_STATE)} has no '{key}': not an "
                              f"apollo_ds checkpoint, or written by an incompatible version")
    if not has_params(tag_dir):
        raise ConfigError(f"checkpoint {tag_dir} has no layout-free {PARAMS}/ copy (written by "
                          f"an older version); resume it once with this version and let it "
                          f"save, then use the new checkpoint")
    return tag_dir, state


def is_run_dir(path: str) -> bool:
    """A run's out_dir (its lock, or a checkpoints/ directory with checkpoints), a
    checkpoints/ directory or one tag directory."""
    ck = os.path.join(path, CHECKPOINTS)
    try:
        has_tags = os.path.isdir(ck) and any(is_tag(t) for t in os.listdir(ck))
    except OSError:         # unreadable: not ours to judge
        has_tags = False
    return (os.path.isfile(os.path.join(path, LOCK)) or has_tags
            or os.path.isfile(os.path.join(ck, LATEST))
            or os.path.isfile(os.path.join(path, LATEST))
            or os.path.isfile(os.path.join(path, RUN_STATE)))


def inside_run_dir(path: str) -> str | None:
    """The run directory (or checkpoint directory) that ``path`` is or lies in, else None."""
    p = os.path.abspath(path)
    while True:
        if os.path.isdir(p) and is_run_dir(p):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


# ------------------------------------------------------------------ the run lock
class RunLock:
    """An advisory ``flock`` on OUT_DIR/run.lock for the life of the process that holds it: the
    kernel drops it when the process dies (kill -9 included), so it never needs cleaning up.
    The holder's pid, host and start time are written into the file for the refusal message."""

    def __init__(self, out_dir: str):
        self.out_dir, self.path, self.fd = out_dir, os.path.join(out_dir, LOCK), None
        self.made_dirs: list[str] = []
        self.old: bytes | None = None      # the file's text before (None: it did not exist)

    def acquire(self) -> "RunLock":
        d = os.path.abspath(self.out_dir)
        while not os.path.exists(d):
            self.made_dirs.append(d)          # deepest first
            d = os.path.dirname(d)
        os.makedirs(self.out_dir, exist_ok=True)
        existed = os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "starting up"
            os.close(fd)
            raise ConfigError(f"train.out_dir={self.out_dir} is in use by another run "
                              f"({holder}; lock {self.path}); wait for it to end or choose "
                              f"another train.out_dir") from None
        self.old = os.pread(fd, 1 << 16, 0) if existed else None
        info = (f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime())}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (info + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self, undo: bool = False) -> None:
        """Unlock; ``undo``: leave the disk as acquire found it (a run refused before any
        work): the file's old text back, or the file and the directories it made removed."""
        if self.fd is None:
            return
        if undo and self.old is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, self.old, 0)
        elif undo:
            os.unlink(self.path)
            for d in self.made_dirs:
                try:
                    os.rmdir(d)
                except OSError:
                    break
        os.close(self.fd)
        self.fd = None


# ------------------------------------------------------------------ the layout-free params
def has_params(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, PARAMS, INDEX))


def param_reader(tag_dir: str):
    """The reader of a checkpoint's state, whatever format backs it: every reader (resume,
    export, eval/generate, init_from) opens it here, behind one ``names`` / ``shape`` /
    ``read`` interface: per-rank fragments (param_store.FragmentReader, read by byte range)
    or, for checkpoints written before them, one ``.pt`` file per parameter (ParamReader)."""
    from apollo_ds import param_store
    d = os.path.join(tag_dir, PARAMS)
    index = param_store.load_index(d)
    if param_store.is_fragment_index(index):
        return param_store.FragmentReader(d, index)
    return ParamReader(tag_dir)


class ParamReader(IndexedParams):
    """One checkpoint's layout-free state, read one parameter at a time by canonical name:
    ``read(name)`` gives its fp32 master and Adam moments, in full or as one tensor-parallel
    slice (and/or a flat range of it), memory-mapped. Every tensor is checked against the shape
    index.json records (and against the caller's, when given): a file cut or swapped is refused
    naming the parameter, the file and both shapes. Only rows index.json marks as vocabulary
    rows may be padded (with zeros, to the caller's padded vocabulary)."""

    def __init__(self, tag_dir: str):
        self.dir = os.path.join(tag_dir, PARAMS)
        index = os.path.join(self.dir, INDEX)
        try:
            with open(index) as f:
                self.index = json.load(f)
            self._read_index(self.index)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{index} is unreadable ({type(e).__name__}: {e}); the "
                              f"checkpoint is incomplete or corrupt: use an older tag") from None

    def vocab_rows(self, name: str) -> bool:
        return bool(self.meta(name).get("vocab_rows", name.endswith("word_embeddings.weight")))

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name + ".pt")

    def read(self, name: str, tp: int = 1, tp_rank: int = 0, padded_rows: int | None = None,
             expect=None, flat: tuple[int, int] | None = None, keys=MOMENTS) -> dict:
        """{key: fp32 tensor} of ``name``: vocabulary rows zero-padded to ``padded_rows``, then
        this TP rank's slice along the recorded partition dim, then ``flat`` = (start, end) of
        the flattened result. ``expect``: the shape the caller's tensor has (before ``flat``)."""
        import torch
        meta, path = self.meta(name), self.file(name)
        want = self.shape(name)
        try:
            entry = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt file, whatever torch says
            raise ConfigError(f"parameter {name}: cannot read {path} ({type(e).__name__}: "
                              f"{str(e)[:200]}); the checkpoint is incomplete or corrupt: use "
                              f"an older tag") from None
        out = {}
        for key in keys:
            t = entry.get(key) if isinstance(entry, dict) else None
            if t is None or not hasattr(t, "shape"):
                raise ConfigError(f"parameter {name}: {path} holds no {key}; the checkpoint is "
                                  f"corrupt: use an older tag")
            if tuple(t.shape) != want:
                raise ConfigError(f"parameter {name}: {path} holds {key} of shape "
                                  f"{list(t.shape)} but {INDEX} records {list(want)}; the "
                                  f"checkpoint is corrupt: use an older tag")
            if padded_rows is not None and self.vocab_rows(name) and t.shape[0] != padded_rows:
                if padded_rows < t.shape[0]:
                    raise ConfigError(f"parameter {name}: {path} has {t.shape[0]} vocabulary "
                                      f"rows, more than this model's {padded_rows}")
                pad = torch.zeros((padded_rows - t.shape[0],) + tuple(t.shape[1:]),
                                  dtype=t.dtype)
                t = torch.cat([t, pad])
            dim = meta.get("partition_dim")
            if dim is not None and tp > 1:
                if t.shape[dim] % tp:
                    raise ConfigError(f"parameter {name}: {path} has {t.shape[dim]} entries "
                                      f"along its tensor-parallel dim {dim}, not divisible by "
                                      f"parallel.tp={tp}")
                t = t.chunk(tp, dim=dim)[tp_rank]
            if expect is not None and tuple(t.shape) != tuple(expect):
                raise ConfigError(f"parameter {name}: {path} gives shape {list(t.shape)} "
                                  f"(recorded {list(want)}) but the model's is {list(expect)}; "
                                  f"the checkpoint was written by another model")
            if flat is not None:
                t = t.reshape(-1)[flat[0]:flat[1]]
            out[key] = t.float().contiguous().clone()
        return out
