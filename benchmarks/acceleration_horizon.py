#!/usr/bin/env python3
"""The saving-versus-horizon curve and the lever table, from several acceleration.py stores.

    .venv/bin/python benchmarks/acceleration_horizon.py [STORE ...] [--recipe grow3_12_const]
        [--markdown FILE] [--plot FILE]

Default stores: benchmarks/results/acceleration_long_n{400,800,1600}.json and
acceleration_long.json (3200 steps), one shape (8 x 96) at four horizons.

Per horizon (one store): tuned scratch = cosine scratch at its swept best LR; the recipe's LR =
the LR of its lowest final eval loss at equal steps on the sweep's seed (bracketed when neither
its smallest nor its largest LR tried). Per seed that both have: "FLOPs to tuned scratch's final
eval loss / scratch's", from the recipe's equal-steps run, or from its equal-FLOPs run when the
equal-steps run never reaches it (the table says which). The trend: an ordinary least-squares
line ratio = a + b log2(steps / 400) through every seed's point, with the standard error of b.

Levers (the longest horizon): every other method's equal-steps runs against the recipe's at the
same LR and seed (paired), and their FLOPs to tuned scratch's loss.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import acceleration_methods as am  # noqa: E402
import acceleration_report as ar  # noqa: E402
from apollo_ds.config import RunConfig, stage_end_steps  # noqa: E402

RES = os.path.join(HERE, "results")
DEFAULT = [os.path.join(RES, f"acceleration_long_n{n}.json") for n in (400, 800, 1600)] + [
    os.path.join(RES, "acceleration_long.json")]


def runs_of(store: dict, method: str, mode: str = "steps") -> list[dict]:
    return [r for r in store["runs"].values() if r["method"] == method and r["mode"] == mode]


def recipe_lr(store: dict, recipe: str, seed: int) -> tuple[float | None, bool, dict]:
    """(best LR on ``seed``, bracketed, {lr: final}) of the recipe's equal-steps runs."""
    res = {r["lr"]: r["final_eval_loss"] for r in runs_of(store, recipe) if r["seed"] == seed}
    if not res:
        return None, False, res
    lrs = sorted(res)
    best = min(lrs, key=res.get)
    return best, best not in (lrs[0], lrs[-1]), res


def target_ratio(run: dict | None, base: dict, for_good: bool = False) -> float | None:
    """FLOPs ``run`` spent to reach ``base``'s final eval loss over the FLOPs base spent;
    ``for_good``: counted from the crossing after which ``run`` stays at or below it (the
    first crossing flatters a curve that runs flat along the target)."""
    if run is None:
        return None
    target, curve = base["curve"][-1]["eval_loss"], run["curve"]
    if for_good:
        above = [i for i, c in enumerate(curve) if c["eval_loss"] > target]
        curve = curve[above[-1]:] if above else curve
    hit, ref = ar.first_reach(curve, target), ar.first_reach(base["curve"], target)
    return hit["flops"] / ref["flops"] if hit else None


def horizon_point(store: dict, recipe: str) -> dict | None:
    sw = store.get("sweeps", {}).get("cosine")
    if not sw:
        return None
    steps, lr_s = store["benchmark"]["steps"], sw["best"]
    lr_r, bracketed, tried = recipe_lr(store, recipe, sw["seed"])
    pt = {"steps": steps, "scratch_lr": lr_s, "scratch_bracketed": sw["bracketed"],
          "scratch_sweep": {float(k): v for k, v in sw["results"].items()},
          "recipe_lr": lr_r, "recipe_bracketed": bracketed, "recipe_sweep": tried, "seeds": []}
    if lr_r is None:
        return pt
    flops_runs = {r["seed"]: r for r in runs_of(store, recipe, "flops") if r["lr"] == lr_r}
    for r in sorted(runs_of(store, recipe), key=lambda r: r["seed"]):
        base = store["runs"].get(ar.run_key("scratch", lr_s, r["seed"], steps))
        if r["lr"] != lr_r or base is None:
            continue
        eq = flops_runs.get(r["seed"])
        ratio, src = target_ratio(r, base), "steps"
        if ratio is None and eq is not None:
            ratio, src = target_ratio(eq, base), "flops"
        good = target_ratio(r if src == "steps" else eq, base, for_good=True)
        bf = base["final_eval_loss"]
        pt["seeds"].append({"seed": r["seed"], "ratio": ratio, "from": src if ratio else None,
                            "ratio_for_good": good,
                            "ratio_eq_flops": target_ratio(eq, base) if src == "steps" else None,
                            "gap_steps": r["final_eval_loss"] - bf,
                            "gap_flops": eq["final_eval_loss"] - bf if eq else None,
                            "scratch_final": bf, **after_growth(r, base)})
    return pt


def after_growth(run: dict, base: dict) -> dict:
    """Where the saving comes from: the run's FLOPs over scratch's at equal steps, and its eval
    loss minus scratch's at the same steps, at the first eval after the last growth and on
    average over the evals after it (both curves evaluate at the same steps)."""
    cfg = RunConfig()            # the trainer's own rule for where the stages end
    cfg.apollo.stage_ends = run["config"]["apollo"].get("stage_ends", [])
    cfg.train.steps = run["steps"]
    ends = stage_end_steps(cfg)
    grown = ends[-2] if len(ends) > 1 else 0
    at = {c["step"]: c["eval_loss"] for c in base["curve"]}
    gaps = [c["eval_loss"] - at[c["step"]] for c in run["curve"]
            if c["step"] > grown and c["step"] in at]
    return {"flops_share": run["total_flops"] / base["total_flops"],
            "gap_first_after": gaps[0] if gaps else None,
            "gap_mean_after": statistics.fmean(gaps) if gaps else None}


def fit(points: list[dict]) -> dict | None:
    """OLS ratio = a + b log2(steps/400) over every seed's reached ratio; b's standard error."""
    xy = [(math.log2(p["steps"] / 400), s["ratio"]) for p in points for s in p["seeds"]
          if s["ratio"] is not None]
    if len({x for x, _ in xy}) < 2:
        return None
    n, mx, my = len(xy), statistics.fmean(x for x, _ in xy), statistics.fmean(y for _, y in xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    b = sum((x - mx) * (y - my) for x, y in xy) / sxx
    a = my - b * mx
    rss = sum((y - a - b * x) ** 2 for x, y in xy)
    se = math.sqrt(rss / (n - 2) / sxx) if n > 2 else float("nan")
    return {"a": a, "b": b, "b_se": se, "n": n}


def lever_rows(store: dict, recipe: str) -> list[dict]:
    """Every other growth method's equal-steps runs, paired with the recipe's (same LR and
    seed), and their FLOPs to tuned scratch's final loss."""
    sw = store.get("sweeps", {}).get("cosine")
    steps = store["benchmark"]["steps"]
    rec = {(r["lr"], r["seed"]): r for r in runs_of(store, recipe)}
    groups: dict[tuple, list[dict]] = {}
    for r in store["runs"].values():
        if r["mode"] == "steps" and not r["method"].startswith("scratch") and r["method"] != recipe:
            groups.setdefault((r["method"], r["lr"]), []).append(r)
    rows = []
    for (method, lr), rs in sorted(groups.items()):
        per = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            base = sw and store["runs"].get(ar.run_key("scratch", sw["best"], r["seed"], steps))
            mine = rec.get((lr, r["seed"]))
            per.append({"seed": r["seed"], "final": r["final_eval_loss"],
                        "vs_recipe": r["final_eval_loss"] - mine["final_eval_loss"]
                        if mine else None,
                        "ratio": target_ratio(r, base) if base else None,
                        "ratio_for_good": target_ratio(r, base, True) if base else None,
                        "flops_total": r["total_flops"] / base["total_flops"] if base else None})
        rows.append({"method": method, "lr": lr, "per_seed": per,
                     "extra": am.describe({"apollo": rs[0]["config"]["apollo"],
                                              "train": rs[0]["definition"].get("train", {})})})
    return rows


def _f(x, fmt="{:+.3f}"):
    return "-" if x is None else fmt.format(x)


def _reach(p: dict, unit: str = "x") -> str:
    """A ratio, and the one counted from where the curve stays below when that is later."""
    if not p["ratio"]:
        return "not reached"
    later = p["ratio_for_good"] and p["ratio_for_good"] - p["ratio"] >= 0.005
    return (f"{p['ratio']:.2f}{unit}"
            + (f" ({p['ratio_for_good']:.2f}{unit} for good)" if later else ""))


def markdown(points: list[dict], tr: dict | None, levers: list[dict], recipe: str) -> str:
    out = [f"Recipe `{recipe}` against tuned scratch, per horizon (8 x 96):", "",
           "| steps | scratch LR (sweep) | recipe LR (sweep, seed 1234) | seeds | gap at equal "
           "steps | gap at equal FLOPs | FLOPs to scratch's final loss / scratch's (per seed; "
           "first crossing, and from where it stays below when later) | mean (min..max) |",
           "|---|---|---|---|---|---|---|---|"]
    for p in points:
        sws = ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(p["scratch_sweep"].items()))
        rws = ", ".join(f"{k:g}: {v:.3f}" for k, v in sorted(p["recipe_sweep"].items()))
        ss = p["seeds"]
        rs = [s["ratio"] for s in ss if s["ratio"] is not None]
        per = ", ".join(
            f"{s['seed']}: {_reach(s, '')}"
            + (" (eq. FLOPs run)" if s["from"] == "flops" else "")
            + (f" (eq. FLOPs run: {s['ratio_eq_flops']:.2f})" if s["ratio_eq_flops"] else "")
            for s in ss)
        mm = (f"{statistics.fmean(rs):.2f} ({min(rs):.2f}..{max(rs):.2f})"
              if len(rs) == len(ss) and rs else "-")
        out.append(
            f"| {p['steps']} | {p['scratch_lr']:g}{'' if p['scratch_bracketed'] else ' (edge)'}"
            f" ({sws}) | " + (f"{p['recipe_lr']:g}{'' if p['recipe_bracketed'] else ' (edge)'}"
                              f" ({rws})" if p["recipe_lr"] else "-")
            + f" | {','.join(str(s['seed']) for s in ss) or '-'} | "
            f"{', '.join(_f(s['gap_steps']) for s in ss) or '-'} | "
            f"{', '.join(_f(s['gap_flops']) for s in ss) or '-'} | {per or '-'} | {mm} |")
    out += ["", "Where the saving comes from: the recipe's FLOPs / scratch's at equal steps, and "
            "its eval loss minus tuned scratch's at the same step, at the first eval after the "
            "growth and averaged over every eval after it.", "",
            "| steps | seed | FLOPs at equal steps | gap, first eval after growth | mean gap "
            "after growth | final gap |", "|---|---|---|---|---|---|"]
    for p in points:
        for s in p["seeds"]:
            out.append(f"| {p['steps']} | {s['seed']} | {s['flops_share']:.2f}x | "
                       f"{_f(s['gap_first_after'])} | {_f(s['gap_mean_after'])} | "
                       f"{_f(s['gap_steps'])} |")
    if tr:
        out += ["", f"Trend (OLS over {tr['n']} seed points): ratio = {tr['a']:.3f} + "
                f"{tr['b']:.3f} (+- {tr['b_se']:.3f} s.e.) x log2(steps / 400)."]
    if levers:
        out += ["", "Levers at the longest horizon: final eval loss minus the recipe's at the "
                "same LR and seed; FLOPs to tuned scratch's final loss / scratch's.", "",
                "| method | stages @ ends | sampler | extra | schedule | lr | seeds | vs recipe "
                "(per seed) | FLOPs total / scratch | FLOPs to scratch's final loss |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in levers:
            e, ps = r["extra"], r["per_seed"]
            out.append(
                f"| {r['method']} | {e['stages']} | {e['sampler']} | {e['extra'] or '-'} | "
                f"{e['schedule']} | {r['lr']:g} | {','.join(str(p['seed']) for p in ps)} | "
                f"{', '.join(_f(p['vs_recipe']) for p in ps)} | "
                f"{_f(ps[0]['flops_total'], '{:.2f}x')} | "
                + ", ".join(_reach(p) for p in ps) + " |")
    return "\n".join(out) + "\n"


def plot(points: list[dict], tr: dict | None, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        rs = [s["ratio"] for s in p["seeds"] if s["ratio"] is not None]
        if rs:
            m = statistics.fmean(rs)
            ax.errorbar([p["steps"]], [m], yerr=[[m - min(rs)], [max(rs) - m]], fmt="o",
                        color="C0", capsize=4)
            ax.scatter([p["steps"]] * len(rs), rs, color="C0", s=8, alpha=0.5)
    if tr:
        xs = [400 * 2 ** (i / 10) for i in range(0, 31)]
        ax.plot(xs, [tr["a"] + tr["b"] * math.log2(x / 400) for x in xs], "--", color="C1",
                label=f"fit: {tr['a']:.2f} + {tr['b']:.3f} log2(steps/400)")
        ax.legend(fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training steps (horizon)")
    ax.set_ylabel("FLOPs to tuned scratch's final loss / scratch's")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stores", nargs="*", default=DEFAULT)
    p.add_argument("--recipe", default="grow3_12_const")
    p.add_argument("--markdown", default=os.path.join(RES, "acceleration_horizon.md"))
    p.add_argument("--plot", default=os.path.join(RES, "acceleration_horizon.png"))
    a = p.parse_args(argv)
    stores = []
    for path in a.stores:
        if os.path.isfile(path):
            with open(path) as f:
                stores.append(json.load(f))
        else:
            print(f"(no store {path}: that horizon is not measured yet)")
    stores.sort(key=lambda s: s["benchmark"]["steps"])
    points = [x for x in (horizon_point(s, a.recipe) for s in stores) if x]
    tr = fit(points)
    levers = lever_rows(stores[-1], a.recipe) if stores else []
    md = markdown(points, tr, levers, a.recipe)
    print(md)
    with open(a.markdown, "w") as f:
        f.write(md)
    print("plot:", plot(points, tr, a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
