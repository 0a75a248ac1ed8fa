"""What a resumed run must keep and what it may change.

A checkpoint records the settings that define the model being trained (``record``). On resume
(``check``) a change to the model shape, the Apollo schedule (resolved to step numbers), the
seed, the global batch, the tokenizer or the data is refused with one line naming the setting,
its old and new values and how to proceed; a change of layout (DP, TP, PP, ZeRO stage,
precision), of train.steps or of any other train setting (intervals, lr, micro-batch) is
accepted and reported, and so are the changes ``train.allow_changes`` lists (data, tokenizer,
global_batch, seed): deliberate, each logged. Under any layout each rank reads the byte ranges
it owns of the checkpoint's per-rank fragment files (portable.py); a checkpoint written before
them is read through DeepSpeed's own files when the layout is unchanged."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field

from apollo_ds.config import ConfigError, RunConfig, stage_end_steps
from apollo_ds.data.tokenizer import fingerprint as tokenizer_fingerprint

# train.* settings a resumed run may not change (the rest are accepted and reported)
_FIXED_TRAIN = ("seed", "global_batch")
_QUIET_TRAIN = ("stop_after", "out_dir", "allow_changes", "init_from",
                "init_from_tag")    # per-invocation settings, not reported


def _sha256(path: str, limit: int | None = None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = limit
        while chunk := f.read(1 << 20 if left is None else min(1 << 20, left)):
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
                if left <= 0:
                    break
    return h.hexdigest()


def data_fingerprint(prefix) -> list | None:
    """(bytes of .bin, bytes of .idx, sha256 of the .idx's first 16 MiB) of every prefix of a
    single prefix or a [weight, prefix, ...] blend: changes when the corpus or its
    tokenization does, not when the files move."""
    if prefix is None:
        return None
    prefixes = prefix if isinstance(prefix, list) else [prefix]
    out = []
    for p in prefixes:
        if isinstance(p, (int, float)):
            out.append(p)
            continue
        sizes = [os.path.getsize(p + ext) if os.path.isfile(p + ext) else None
                 for ext in (".bin", ".idx")]
        out.append(sizes + [_sha256(p + ".idx", 16 << 20)])
    return out


def _category(name: str) -> str | None:
    """The train.allow_changes entry that accepts a change of ``name`` (None: never)."""
    if name in ("data.prefix", "data.split"):
        return "data"
    if name == "data.tokenizer":
        return "tokenizer"
    return name[len("train."):] if name.startswith("train.") else None


_ALLOWED_NOTE = {"train.global_batch": "; step s now reads samples [(s-1)*B, s*B) of the new "
                 "batch size B, so the data position moves with it"}


def layout_of(dist, zero: int, dtype) -> dict:
    return {"dp": dist.dp, "tp": dist.tp, "pp": dist.pp, "zero": zero, "dtype": str(dtype)}


def record(cfg: RunConfig, layout: dict) -> dict:
    """The settings a checkpoint carries (merged into run_state.json)."""
    return {"model": asdict(cfg.model), "apollo": asdict(cfg.apollo),
            "stage_end_steps": stage_end_steps(cfg)[:-1] if cfg.apollo.enabled else [],
            "train": asdict(cfg.train), "layout": layout,
            "tp": layout["tp"], "pp": layout["pp"], "dp": layout["dp"],
            "data": {"prefix": cfg.data.prefix, "split": cfg.data.split,
                     "tokenizer": os.path.abspath(cfg.data.tokenizer) if cfg.data.tokenizer
                     else None,
                     "tokenizer_sha256": tokenizer_fingerprint(cfg.data.tokenizer,
                                                               cfg.data.tokenizer_type),
                     "fingerprint": data_fingerprint(cfg.data.prefix)}}


@dataclass
class Verdict:
    same_layout: bool
    notes: list[str] = field(default_factory=list)   # accepted changes, one line each


def check(state: dict, cfg: RunConfig, layout: dict, where: str) -> Verdict:
    """Refuse (ConfigError, one line) what a resume cannot honour; return how to load and the
    accepted changes. ``state`` is the checkpoint's run_state; ``layout`` this run's."""
    step = state.get("step", 0)
    if isinstance(step, int) and step > cfg.train.steps:
        raise ConfigError(f"cannot resume from {where}: it is at step {step} but train.steps="
                          f"{cfg.train.steps}; raise train.steps to at least {step} to "
                          f"continue, or use a new train.out_dir to start another run")
    refused = []
    saved_model, mine = state.get("model", {}), asdict(cfg.model)
    refused += [(f"model.{k}", saved_model[k], mine[k]) for k in mine
                if k in saved_model and saved_model[k] != mine[k]]
    saved_apollo, apollo = state.get("apollo", {}), asdict(cfg.apollo)
    new_ends = stage_end_steps(cfg)[:-1] if cfg.apollo.enabled else []
    if "stage_end_steps" in state:
        # compare the schedule in steps: fractions of another train.steps may be the same steps
        if state["stage_end_steps"] != new_ends:
            refused.append(("apollo.stage_ends (in steps)", state["stage_end_steps"], new_ends))
        apollo.pop("stage_ends")
    refused += [(f"apollo.{k}", saved_apollo[k], apollo[k]) for k in apollo
                if k in saved_apollo and saved_apollo[k] != apollo[k]]
    saved_train, train = state.get("train", {}), asdict(cfg.train)
    refused += [(f"train.{k}", saved_train[k], train[k]) for k in _FIXED_TRAIN
                if k in saved_train and saved_train[k] != train[k]]
    data = state.get("data", {})
    new_tok = tokenizer_fingerprint(cfg.data.tokenizer, cfg.data.tokenizer_type)
    if data.get("tokenizer_sha256") and data["tokenizer_sha256"] != new_tok:
        refused.append(("data.tokenizer", f"{data.get('tokenizer')} (sha256 "
                        f"{data['tokenizer_sha256'][:12]})", f"{cfg.data.tokenizer} (sha256 "
                        f"{(new_tok or 'missing')[:12]})"))
    if data.get("fingerprint") is not None and data["fingerprint"] != data_fingerprint(
            cfg.data.prefix):
        refused.append(("data.prefix", data.get("prefix"), cfg.data.prefix))
    if "split" in data and data["split"] != cfg.data.split:
        refused.append(("data.split", data["split"], cfg.data.split))
    notes, allowed = [], set(cfg.train.allow_changes)
    for name, old, new in [r for r in refused if _category(r[0]) in allowed]:
        notes.append(f"{name} changed on resume: {old} -> {new} (allowed by train.allow_changes)"
                     + _ALLOWED_NOTE.get(name, ""))
    refused = [r for r in refused if _category(r[0]) not in allowed]
    if refused:
        name, old, new = refused[0]
        more = f" (and {len(refused) - 1} more: " + ", ".join(r[0] for r in refused[1:]) + ")" \
            if len(refused) > 1 else ""
        hint = ""
        if name.startswith("apollo.stage_ends") and saved_train.get("steps") != cfg.train.steps:
            hint = (f"; to train longer under the same schedule pass the ends as step numbers: "
                    f"apollo.stage_ends=[{','.join(str(e) for e in state['stage_end_steps'])}]")
        allow = (f"; to change it on purpose, list it in train.allow_changes=["
                 f"{_category(name)}]" if _category(name) else "")
        raise ConfigError(f"cannot resume from {where}: {name} was {old}, this run has {new}"
                          f"{more}; restore the checkpoint's setting to resume, or use a new "
                          f"train.out_dir to start another run{hint}{allow}")
    old_layout = state.get("layout") or {k: state[k] for k in ("dp", "tp", "pp") if k in state}
    changed = {k: (old_layout[k], layout[k]) for k in layout
               if k in old_layout and old_layout[k] != layout[k]}
    if changed:
        notes.append("resuming under another layout (" + ", ".join(
            f"{k} {a} -> {b}" for k, (a, b) in changed.items()) + "): loading the layout-free "
            "per-parameter state")
    for k in train:
        if k in saved_train and k not in _FIXED_TRAIN + _QUIET_TRAIN and saved_train[k] != train[k]:
            notes.append(f"train.{k} changed on resume: {saved_train[k]} -> {train[k]}")
    old_wide = saved_train.get("micro_batch", 0) * old_layout.get("dp", 0)
    new_wide = cfg.train.micro_batch * layout["dp"]
    if old_wide and old_wide != new_wide:
        notes.append(f"the data-parallel-wide micro-batch changed ({old_wide} -> {new_wide} "
                     f"samples): the run continues on the same samples, but its depth plan and "
                     f"loss arithmetic differ from the uninterrupted run's from here on")
    return Verdict(same_layout=not changed, notes=notes)
