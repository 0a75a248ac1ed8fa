"""Analysis of benchmarks/acceleration.py's results store: per-seed comparisons of each method
with its scratch baseline (same schedule family, LR and seed), seed means and spreads, the
"no difference" verdict, the markdown table and the loss-vs-FLOPs plot.

    .venv/bin/python benchmarks/acceleration_report.py [benchmarks/results/acceleration.json]
        [--markdown FILE] [--plot FILE]

Two comparisons, both paired by seed:
  equal steps  the method's run at scratch's steps: its final eval loss against scratch's, and
               the FLOPs it spent when it first reached scratch's final eval loss (linearly
               interpolated between evaluations) over the FLOPs scratch spent to get there;
  equal FLOPs  the method's run lengthened to spend scratch's FLOPs (more steps, same stage
               fractions): its final eval loss against scratch's.
Spread: min..max over seeds. A mean difference of final losses no larger than the seed spread
(the larger of the two groups' max - min) is "no difference"; the paired differences (same
seed) are printed beside it, with how many seeds agree in sign.
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


# ----------------------------------------------------------------------------- curves
def eval_points(recs: list[dict]) -> list[dict]:
    """Evaluation records of a run's metrics (with train-only seconds accumulated)."""
    out, train_s = [], 0.0
    for r in recs:
        train_s += r.get("step_time_s", 0.0)
        if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]):
            out.append({"step": r["step"], "eval_loss": r["eval_loss"],
                        "flops": r["cum_flops"], "wall_s": r["wall_s"], "train_s": train_s})
    return out


def first_reach(points: list[dict], target: float) -> dict | None:
    """First evaluation at or below target, with FLOPs / seconds linearly interpolated
    between it and the evaluation before (loss assumed linear in between)."""
    for i, p in enumerate(points):
        if p["eval_loss"] <= target:
            res = {"step": p["step"]}
            q = points[i - 1] if i > 0 else p
            f = ((q["eval_loss"] - target) / (q["eval_loss"] - p["eval_loss"])
                 if q["eval_loss"] != p["eval_loss"] else 1.0)
            for k in ("flops", "wall_s", "train_s"):
                res[k] = q[k] + f * (p[k] - q[k])
            return res
    return None


# ----------------------------------------------------------------------------- statistics
def spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def fmt_spread(s: dict | None, digits: int = 3, unit: str = "") -> str:
    if not s:
        return "-"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f}{unit}"
    return (f"{s['mean']:.{digits}f}{unit} ({s['min']:.{digits}f}..{s['max']:.{digits}f}, "
            f"n={s['n']})")


def verdict(method_finals: list[float], base_finals: list[float]) -> dict:
    """Unpaired rule of the issue: |mean difference| <= the seed spread -> no difference.
    The spread is the larger max - min of the two groups (0 with one seed each, where any
    difference counts, flagged by n)."""
    d = statistics.fmean(method_finals) - statistics.fmean(base_finals)
    sp = max(max(method_finals) - min(method_finals), max(base_finals) - min(base_finals))
    n = min(len(method_finals), len(base_finals))
    if n < 2:
        word = "one seed: spread unknown"
    elif abs(d) <= sp:
        word = "no difference"
    else:
        word = "better" if d < 0 else "worse"
    return {"mean_diff": d, "seed_spread": sp, "verdict": word}


# ----------------------------------------------------------------------------- analysis
def comparisons(store: dict, base_lr: float | None = None) -> list[dict]:
    """One row per (method, lr, steps mode) with >= 1 seed whose baseline run exists: scratch
    of the method's family at the same LR, or with ``base_lr`` cosine scratch at that LR
    (the tuned scratch; other scratch LRs are then left out)."""
    runs = store["runs"]
    base_steps = store["benchmark"]["steps"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs.values():
        groups.setdefault((r["method"], r["lr"], r["mode"]), []).append(r)
    rows = []
    def order(kv):   # by LR; baselines first; equal steps before equal FLOPs
        (method, lr, mode) = kv[0]
        return lr, not method.startswith("scratch"), method, mode != "steps"

    for (method, lr, mode), rs in sorted(groups.items(), key=order):
        base_name = am.baseline_for(rs[0]["definition"]) if base_lr is None else "scratch"
        if base_lr is not None and method.startswith("scratch") and (method, lr) != (
                "scratch", base_lr):
            continue
        pairs = []
        for r in sorted(rs, key=lambda r: r["seed"]):
            b = runs.get(run_key(base_name, lr if base_lr is None else base_lr, r["seed"],
                                 base_steps))
            if b is None:
                continue
            target = b["curve"][-1]["eval_loss"]
            ref = first_reach(b["curve"], target)
            hit = first_reach(r["curve"], target)
            pairs.append({
                "seed": r["seed"], "final": r["curve"][-1]["eval_loss"], "base_final": target,
                "gap": r["curve"][-1]["eval_loss"] - target,
                "flops_ratio_total": r["curve"][-1]["flops"] / b["curve"][-1]["flops"],
                "flops_ratio_at_target": hit["flops"] / ref["flops"] if hit else None,
                "wall_ratio_at_target": hit["wall_s"] / ref["wall_s"] if hit else None,
                "reached_at_step": hit["step"] if hit else None, "steps": r["steps"]})
        if not pairs:
            continue
        finals = [p["final"] for p in pairs]
        bfinals = [p["base_final"] for p in pairs]
        ratios = [p["flops_ratio_at_target"] for p in pairs]
        reached = [x for x in ratios if x is not None]
        row = {"method": method, "lr": lr, "mode": mode, "baseline": base_name,
               "seeds": [p["seed"] for p in pairs],
               # the run's own apollo section: stage counts as scaled to its --layers
               **am.describe({"apollo": rs[0]["config"]["apollo"],
                              "train": rs[0]["definition"].get("train", {})}),
               "final": spread(finals), "base_final": spread(bfinals),
               "gap": spread([p["gap"] for p in pairs]),
               "gap_same_sign": max(sum(p["gap"] < 0 for p in pairs),
                                    sum(p["gap"] > 0 for p in pairs)),
               "flops_total": spread([p["flops_ratio_total"] for p in pairs]),
               "reached": f"{len(reached)}/{len(pairs)}",
               "flops_at_target": spread(reached) if reached else None,
               "per_seed": pairs}
        if method != base_name:
            row.update(verdict(finals, bfinals))
        rows.append(row)
    return rows


def run_key(method: str, lr: float, seed: int, steps: int) -> str:
    return f"{method}_lr{lr:g}_s{seed}_n{steps}"


def sampler_contrasts(rows: list[dict]) -> list[dict]:
    """Same stages, schedule, LR and mode, different sampler / state handling: each non-
    constant_low row against its constant_low sibling (does depth sampling earn its place?)."""
    out = []
    for r in rows:
        if r["sampler"] in ("-", "constant_low") or r["mode"] != "steps":
            continue
        for c in rows:
            if (c["sampler"] == "constant_low" and c["stages"] == r["stages"]
                    and c["schedule"] == r["schedule"] and c["lr"] == r["lr"]
                    and c["mode"] == r["mode"] and "grow=stack" not in c["extra"]):
                common = sorted(set(r["seeds"]) & set(c["seeds"]))
                if not common:
                    continue
                f = {p["seed"]: p["final"] for p in r["per_seed"]}
                g = {p["seed"]: p["final"] for p in c["per_seed"]}
                v = verdict([f[s] for s in common], [g[s] for s in common])
                out.append({"method": r["method"], "vs": c["method"], "seeds": common,
                            "paired_diff": spread([f[s] - g[s] for s in common]), **v})
    return out


# ----------------------------------------------------------------------------- output
def table_markdown(rows: list[dict], store: dict) -> str:
    lines = ["| method | stages @ ends | sampler | state | extra | schedule | lr | seeds | "
             "steps | final eval loss | scratch final | gap (paired) | verdict | FLOPs "
             "(total / scratch) | FLOPs to scratch's final loss / scratch's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = sorted({p["steps"] for p in r["per_seed"]})
        steps_s = "/".join(str(s) for s in steps) + (" (equal FLOPs)" if r["mode"] == "flops"
                                                   else "")
        at = (fmt_spread(r["flops_at_target"], 2, "x") + f" [{r['reached']} reached]"
              if r["flops_at_target"] else f"not reached [0/{len(r['seeds'])}]")
        if r["method"] == r["baseline"]:
            at, gap, word = "1.00x (reference)", "-", "-"
        else:
            gap = fmt_spread(r["gap"], 3) + f" [{r['gap_same_sign']}/{len(r['seeds'])} same sign]"
            word = r["verdict"]
        lines.append(
            f"| {r['method']} | {r['stages']} | {r['sampler']} | {r['state']} | "
            f"{r['extra'] or '-'} | {r['schedule']} | {r['lr']:g} | "
            f"{','.join(str(s) for s in r['seeds'])} | {steps_s} | {fmt_spread(r['final'])} | "
            f"{fmt_spread(r['base_final'])} | {gap} | {word} | "
            f"{fmt_spread(r['flops_total'], 2, 'x')} | {at} |")
    return "\n".join(lines)


def sweep_markdown(store: dict) -> str:
    out = []
    for fam, sw in sorted(store.get("sweeps", {}).items()):
        cells = ", ".join(f"{float(k):g}: {v:.4f}" for k, v in
                          sorted(sw["results"].items(), key=lambda kv: float(kv[0])))
        out.append(f"- scratch LR sweep, {fam}, seed {sw['seed']}, {sw['steps']} steps "
                   f"(final eval loss): {cells} -> best {sw['best']:g}"
                   + ("" if sw.get("bracketed") else " (NOT bracketed: best at an edge)"))
    return "\n".join(out)


def tuned_lr(store: dict) -> float | None:
    """Cosine scratch's swept best LR (the tuned baseline), if swept."""
    sw = store.get("sweeps", {}).get("cosine")
    return sw["best"] if sw else None


def full_markdown(store: dict, an: dict) -> str:
    """The sweeps, the same-LR table and, if scratch was swept, the tuned-scratch table."""
    out = sweep_markdown(store) + "\n\n" + table_markdown(an["rows"], store) + "\n"
    if an.get("tuned_rows"):
        out += (f"\nAgainst tuned scratch (cosine, lr {tuned_lr(store):g}, same seed): every "
                f"method at its own LR; \"scratch final\" is the tuned run's.\n\n"
                + table_markdown(an["tuned_rows"], store) + "\n")
    return out


def print_report(store: dict, rows: list[dict], contrasts: list[dict],
                 tuned: list[dict] | None = None) -> None:
    print()
    print(sweep_markdown(store) or "(no LR sweep recorded)")
    for title, rs in (("same-LR scratch", rows), (f"tuned scratch (lr {tuned_lr(store)})",
                                                   tuned or [])):
        if rs:
            print(f"against {title}:")
            _print_rows(rs)
    for c in contrasts:
        print(f"sampler: {c['method']} vs {c['vs']} (seeds {c['seeds']}): mean diff "
              f"{c['mean_diff']:+.3f}, seed spread {c['seed_spread']:.3f}, paired "
              f"{fmt_spread(c['paired_diff'])} -> {c['verdict']}")


def _print_rows(rows: list[dict]) -> None:
    hdr = (f"{'method':<24} {'lr':>7} {'mode':>5} {'seeds':>9} {'final eval':>26} "
           f"{'gap vs scratch':>26} {'verdict':>14} {'FLOPs@target':>24}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        at = (fmt_spread(r["flops_at_target"], 2) + f" {r['reached']}"
              if r["flops_at_target"] else "not reached")
        gap = "-" if r["method"] == r["baseline"] else fmt_spread(r["gap"], 3)
        print(f"{r['method']:<24} {r['lr']:>7g} {r['mode']:>5} "
              f"{','.join(map(str, r['seeds'])):>9} {fmt_spread(r['final']):>26} {gap:>26} "
              f"{r.get('verdict', '-'):>14} {at:>24}")


def plot(store: dict, rows: list[dict], path: str, seed: int | None = None) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (.venv/bin/pip install matplotlib): no plot")
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    counts: dict[int, int] = {}
    for r in rows:
        for s in r["seeds"]:
            counts[s] = counts.get(s, 0) + 1
    if seed is None and counts:   # the seed with the most methods (ties: the sweep's)
        sweep_seeds = {sw["seed"] for sw in store.get("sweeps", {}).values()}
        seed = max(counts, key=lambda s: (counts[s], s in sweep_seeds))
    lo, hi = math.inf, -math.inf
    for r in rows:
        run = store["runs"].get(run_key(r["method"], r["lr"], seed,
                                        r["per_seed"][0]["steps"]))
        if run is None:
            continue
        c = run["curve"]
        label = f"{r['method']} lr {r['lr']:g}" + (" (equal FLOPs)" if r["mode"] == "flops"
                                                   else "")
        ax.plot([p["flops"] for p in c], [p["eval_loss"] for p in c], marker="o",
                markersize=2, linewidth=1, label=label,
                linestyle="--" if r["method"].startswith("scratch") else "-")
        lo, hi = min(lo, c[-1]["eval_loss"]), max(hi, c[-1]["eval_loss"])
    if not math.isfinite(lo):
        plt.close(fig)
        return None
    ax.set_ylim(lo - 0.1, hi + 1.0)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("eval loss (full depth)")
    ax.set_title(f"eval loss vs training FLOPs, seed {seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def analyse_store(store: dict) -> dict:
    rows = comparisons(store)
    best = tuned_lr(store)
    return {"rows": rows, "sampler_contrasts": sampler_contrasts(rows),
            "tuned_rows": comparisons(store, best) if best is not None else []}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default=os.path.join(HERE, "results",
                                                              "acceleration.json"))
    p.add_argument("--markdown", default=None, help="write the ablation table here")
    p.add_argument("--plot", default=None, help="write the loss-vs-FLOPs PNG here")
    p.add_argument("--plot-methods", default=None, help="comma list (default: all)")
    p.add_argument("--plot-seed", type=int, default=None)
    a = p.parse_args(argv)
    with open(a.results) as f:
        store = json.load(f)
    an = analyse_store(store)
    print_report(store, an["rows"], an["sampler_contrasts"], an["tuned_rows"])
    md = full_markdown(store, an)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    else:
        print()
        print(md)
    if a.plot:
        keep = set(a.plot_methods.split(",")) if a.plot_methods else None
        rows = [r for r in an["rows"] if keep is None or r["method"] in keep]
        print("plot:", plot(store, rows, a.plot, a.plot_seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
