"""Input documents for the data tools: files, folders and globs of ``.txt`` / ``.jsonl`` /
``.json`` files, each optionally gzip-compressed (``.gz``).

A ``.txt`` line is one document; a ``.jsonl`` line is one JSON object whose text is under a
key, which may be dotted (``meta.body`` reads ``{"meta": {"body": ...}}``). Blank lines and
empty texts are skipped. Errors name the file and line.
"""
from __future__ import annotations

import glob
import gzip
import json
import os

from apollo_ds.config import ConfigError

TEXT_SUFFIXES = (".txt", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
SUFFIXES = tuple(s + z for s in TEXT_SUFFIXES + JSON_SUFFIXES for z in ("", ".gz"))


def is_json(path: str) -> bool:
    return path[:-3].endswith(JSON_SUFFIXES) if path.endswith(".gz") else \
        path.endswith(JSON_SUFFIXES)


def expand(specs: list[str]) -> list[str]:
    """Files, folders (searched recursively for SUFFIXES files, sorted) and globs -> the
    input files, in order, each once. ConfigError for a spec that names nothing."""
    out: list[str] = []
    for spec in map(str, specs):
        if os.path.isdir(spec):
            found = sorted(os.path.join(root, n) for root, _, names in os.walk(spec)
                           for n in names if n.endswith(SUFFIXES))
            if not found:
                raise ConfigError(f"input folder {spec} holds no {'/'.join(SUFFIXES)} files")
        elif os.path.isfile(spec):
            found = [spec]
        elif glob.has_magic(spec):
            found = []
            for m in sorted(glob.glob(spec, recursive=True)):
                found += expand([m]) if os.path.isdir(m) else [m]
            if not found:
                raise ConfigError(f"input pattern {spec} matches no files")
        else:
            raise ConfigError(f"input file not found: {spec}")
        out += [p for p in found if p not in out]
    return out


def open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def raw_position(f) -> int:
    """Bytes of the file on disk consumed so far (compressed bytes for .gz), for progress."""
    return (f.fileobj if isinstance(f, gzip.GzipFile) else f).tell()


def lines(path: str):
    """(line number, raw bytes line, on-disk bytes consumed since the previous line)."""
    with open_binary(path) as f:
        last = 0
        try:
            for lineno, raw in enumerate(f, 1):
                pos = raw_position(f)
                yield lineno, raw, pos - last
                last = pos
        except (OSError, EOFError) as e:     # a damaged .gz
            raise ConfigError(f"{path}: cannot read past line {lineno if last else 0} "
                              f"({e})") from None


def field(record, key: str):
    """record[key], where a dotted key walks nested objects (an exact top-level key wins)."""
    if isinstance(record, dict) and key in record:
        return record[key]
    for part in key.split("."):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


def document(path: str, lineno: int, raw: bytes, key: str) -> str | None:
    """The text of one input line, None for a blank line or empty text; ValueError naming
    file:line for a line that is not valid UTF-8 or not a record with a string under key."""
    try:
        line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
    if is_json(path):
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        text = field(rec, key)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field "
                             f"'{key}' (see --json-key)")
        line = text
    return line if line.strip() else None


def has_text(path: str) -> bool:
    try:
        return any(raw.strip() for _, raw, _ in lines(path))
    except ConfigError:
        return True      # let the reading itself report it, with the line
