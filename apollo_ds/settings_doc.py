"""Every run setting with its default and meaning, for ``apollo-ds config``.

The meanings are the comments beside (or just above) each field in config.py, read from its
source, so the listing cannot drift from the code; the choices of enumerated settings come from
config.py's own tuples.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

from apollo_ds import config as C

CHOICES = {("apollo", "sampler"): C.SAMPLERS, ("apollo", "grow"): C.GROW_METHODS,
           ("apollo", "optimizer_state"): C.OPTIMIZER_STATE_MODES,
           ("apollo", "update_scale"): C.UPDATE_SCALES, ("model", "arch"): C.ARCHS,
           ("train", "optimizer"): C.OPTIMIZERS, ("train", "recompute"): C.RECOMPUTE,
           ("train", "on_nonfinite"): C.ON_NONFINITE, ("train", "lr_schedule"): C.LR_SCHEDULES,
           ("data", "tokenizer_type"): ("auto", "sentencepiece", "huggingface", "gpt2",
                                        "tiktoken")}


def _comment(lines: list[str], lineno: int, end: int) -> str:
    """The comment block above line ``lineno`` (1-based) plus the field's trailing comment and
    its indented continuation lines."""
    indent = len(lines[lineno - 1]) - len(lines[lineno - 1].lstrip())
    above, i = [], lineno - 2
    # a block at the field's own indentation (deeper lines continue the previous field's)
    while i >= 0 and lines[i].strip().startswith("#") and \
            len(lines[i]) - len(lines[i].lstrip()) == indent:
        above.insert(0, lines[i].strip()[1:].strip())
        i -= 1
    trail = []
    code = lines[lineno - 1]
    if "  # " in code:
        trail.append(code.split("  # ", 1)[1].strip())
        col = code.index("  # ") + 2
        j = end
        while j < len(lines) and lines[j].strip().startswith("#") and \
                len(lines[j]) - len(lines[j].lstrip()) >= col:
            trail.append(lines[j].strip()[1:].strip())
            j += 1
    return " ".join(above + trail)


def settings() -> list[dict]:
    """[{name, default, meaning, choices}] for every field of every RunConfig section."""
    lines = inspect.getsource(C).splitlines()
    tree = ast.parse("\n".join(lines))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    defaults = C.RunConfig()
    out = []
    for sec in dataclasses.fields(C.RunConfig):
        cls = type(getattr(defaults, sec.name))
        node = classes[cls.__name__]
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                key = stmt.target.id
                out.append({"name": f"{sec.name}.{key}",
                            "default": getattr(getattr(defaults, sec.name), key),
                            "meaning": _comment(lines, stmt.lineno, stmt.end_lineno),
                            "choices": list(CHOICES.get((sec.name, key), ()))})
    return out


def format_settings(rows: list[dict], values: dict | None = None) -> str:
    out = []
    for r in rows:
        head = f"{r['name']} = {json.dumps(r['default'])}"
        if values is not None and values.get(r["name"], r["default"]) != r["default"]:
            head += f"   (this config: {json.dumps(values[r['name']])})"
        out.append(head)
        meaning = r["meaning"] + (f" Choices: {', '.join(r['choices'])}." if r["choices"]
                                  else "")
        if meaning.strip():
            out += textwrap.wrap(meaning.strip(), 96, initial_indent="    ",
                                 subsequent_indent="    ")
    return "\n".join(out)
