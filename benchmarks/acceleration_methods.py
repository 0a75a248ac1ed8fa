"""Method definitions of benchmarks/acceleration.py: named sets of config overrides.

A method is {"apollo": {...}, "train": {...}}: keys overriding the benchmark's generated config
(apollo.enabled=false and cosine when absent). Its schedule family (train.lr_schedule) picks
the scratch baseline it is compared with: "scratch" (cosine) or "scratch_wsd".

wsd methods and scratch_wsd all decay over the last 70% of the run (train.decay=0.7), so the
decay starts after every expansion here (last stage end <= 0.3) and the baseline's schedule is
the method's own, step for step.
"""
from __future__ import annotations

import copy

import yaml

WSD = {"lr_schedule": "wsd", "decay": 0.7}
RELEASE_STAGES = {"stages": [1, 3, 6, 12], "stage_ends": [0.05, 0.10, 0.25]}


def _grow(stages, ends, sampler="constant_low", state="copy", grow="interpolate", **extra):
    return {"enabled": True, "stages": list(stages), "stage_ends": list(ends),
            "sampler": sampler, "grow": grow, "optimizer_state": state, **extra}


METHODS: dict[str, dict] = {
    # baselines
    "scratch": {"apollo": {"enabled": False}},
    "scratch_wsd": {"apollo": {"enabled": False}, "train": dict(WSD)},
    # the release's schedule 1/3/6/12 at 5/10/25% with LVPS, by optimizer-state handling
    "apollo_copy": {"apollo": _grow([1, 3, 6, 12], [0.05, 0.10, 0.25], "lvps", "copy")},
    "apollo_copy_scaled": {"apollo": _grow([1, 3, 6, 12], [0.05, 0.10, 0.25], "lvps",
                                           "copy_scaled")},
    "apollo_reset": {"apollo": _grow([1, 3, 6, 12], [0.05, 0.10, 0.25], "lvps", "reset")},
    "apollo_release": {"apollo": _grow([1, 3, 6, 12], [0.05, 0.10, 0.25], "lvps", "release")},
    "stack": {"apollo": _grow([1, 3, 6, 12], [0.05, 0.10, 0.25], "constant_low", "copy",
                              grow="stack")},
    # one growth to full depth (the best-known family)
    "grow6_12_const": {"apollo": _grow([6, 12], [0.25])},
    "grow6_12_const_wsd": {"apollo": _grow([6, 12], [0.25]), "train": dict(WSD)},
    "grow6_12_const_noise": {"apollo": _grow([6, 12], [0.25], growth_noise=0.01)},
    "grow6_12_lvps": {"apollo": _grow([6, 12], [0.25], "lvps")},
    "grow6_12_lvps_cs": {"apollo": _grow([6, 12], [0.25], "lvps", "copy_scaled")},
    "grow6_12_lvps_inv": {"apollo": _grow([6, 12], [0.25], "lvps", "copy_scaled",
                                          update_scale="inv_uses")},
    "grow6_12_lvps_inv_wsd": {"apollo": _grow([6, 12], [0.25], "lvps", "copy_scaled",
                                              update_scale="inv_uses"), "train": dict(WSD)},
    "grow4_12_const": {"apollo": _grow([4, 12], [0.3])},
    "grow4_12_const_wsd": {"apollo": _grow([4, 12], [0.3]), "train": dict(WSD)},
    "grow3_12_const": {"apollo": _grow([3, 12], [0.3])},
    "grow6_12_const_35": {"apollo": _grow([6, 12], [0.35])},
    "grow4_8_12_const": {"apollo": _grow([4, 8, 12], [0.15, 0.3])},
}


def parse_define(text: str) -> tuple[str, dict]:
    """'NAME: section.key=value section.key=value ...' (values are YAML) -> (NAME, method).
    Starts from apollo.enabled=true with interpolate/copy/constant_low when any apollo key is
    given, else from scratch."""
    if ":" not in text:
        raise ValueError(f"--define '{text}': expected 'NAME: section.key=value ...'")
    name, body = text.split(":", 1)
    name = name.strip()
    if not name or any(c in name for c in " /,"):
        raise ValueError(f"--define '{text}': method name '{name}' must be non-empty without "
                         f"spaces, '/' or ','")
    out: dict = {"apollo": {"enabled": False}}
    items = body.split()
    if any(i.startswith("apollo.") for i in items):
        out["apollo"] = {"enabled": True, "sampler": "constant_low", "grow": "interpolate",
                         "optimizer_state": "copy"}
    for item in items:
        key, sep, val = item.partition("=")
        sec, dot, field = key.partition(".")
        if not sep or not dot or sec not in ("apollo", "train", "model"):
            raise ValueError(f"--define '{text}': '{item}' is not apollo|train|model.KEY=VALUE")
        out.setdefault(sec, {})[field] = yaml.safe_load(val)
    return name, out


def get(name: str, extra: dict | None = None) -> dict:
    table = {**METHODS, **(extra or {})}
    if name not in table:
        raise KeyError(name)
    m = copy.deepcopy(table[name])
    m.setdefault("apollo", {"enabled": False})
    m.setdefault("train", {})
    return m


def family(method: dict) -> str:
    return method.get("train", {}).get("lr_schedule", "cosine")


def baseline_for(method: dict) -> str:
    return "scratch" if family(method) == "cosine" else f"scratch_{family(method)}"


def describe(method: dict) -> dict:
    """The columns of the ablation table: stages, sampler, state handling, extras, schedule."""
    ap, tr = method.get("apollo", {}), method.get("train", {})
    if not ap.get("enabled"):
        return {"stages": "12 (full)", "sampler": "-", "state": "-", "extra": "",
                "schedule": family(method)}
    stages = "/".join(str(s) for s in ap.get("stages", []))
    ends = "/".join(f"{e:g}" for e in ap.get("stage_ends", []))
    extra = []
    if ap.get("grow", "interpolate") != "interpolate":
        extra.append(f"grow={ap['grow']}")
    if ap.get("update_scale", "none") != "none":
        extra.append(f"update_scale={ap['update_scale']}")
    if ap.get("growth_noise", 0):
        extra.append(f"noise={ap['growth_noise']:g}")
    for k in ("beta2", "rewarmup_steps", "lr_after_growth"):
        if k in tr:
            extra.append(f"{k}={tr[k]}")
    return {"stages": f"{stages} @ {ends}", "sampler": ap.get("sampler", "lvps"),
            "state": ap.get("optimizer_state", "copy"), "extra": " ".join(extra),
            "schedule": family(method)}


def expected_cost(method: dict, layers: int, hidden: int, seq_len: int, vocab: int) -> float:
    """Expected training FLOPs of a method's run as a fraction of scratch's at the same steps,
    from the exact depth distributions (apollo_ds.flops convention)."""
    from apollo_ds import flops
    from apollo_ds.apollo import expected_depth
    from apollo_ds.config import ModelConfig
    ap = method.get("apollo", {})
    per_layer = flops.layer_forward_flops_per_token(hidden, seq_len)
    head = 2 * hidden * flops.padded_vocab(vocab, ModelConfig().pad_vocab_to)
    if not ap.get("enabled"):
        return 1.0
    bounds = [0.0] + list(ap["stage_ends"]) + [1.0]
    cost = 0.0
    for n, lo, hi in zip(ap["stages"], bounds, bounds[1:]):
        d = expected_depth(ap.get("sampler", "lvps"), layers, n)
        cost += (hi - lo) * (d * per_layer + head)
    return cost / (layers * per_layer + head)
