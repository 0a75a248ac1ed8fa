"""Summaries and console tables of benchmarks/throughput.py: medians, quartiles and the
pool/plain ratios of the step times its workers measure, the Trainer-route table with the
pipeline-bubble fit, and the merging of several launches of one layout. Pure Python (no torch),
so the driver can summarise the workers' JSON without importing the training stack."""
from __future__ import annotations

import statistics


def summarise(step_times: dict, tokens: int, cpu_times: dict | None = None) -> dict:
    """Per arm: step-time medians, quartiles, fastest and tokens/s; the pool/plain (and
    pool/ddp) ratios from medians, means and fastest steps, and from the median CPU seconds of
    a step when ``cpu_times`` (the process's CPU time per step) are given."""
    out = {}
    for which, ts in step_times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[which] = {"steps": len(ts), "median_step_s": med, "mean_step_s": statistics.fmean(ts),
                      "min_step_s": min(ts),
                      "p25_step_s": q[0], "p75_step_s": q[2],
                      "tokens_per_s": tokens / med,
                      "tokens_per_s_mean": tokens / statistics.fmean(ts)}
    out["ratio_pool_over_plain"] = out["pool"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["ratio_pool_over_plain_mean"] = (out["pool"]["tokens_per_s_mean"]
                                         / out["plain"]["tokens_per_s_mean"])
    # interference from other jobs only ever adds time: the fastest steps are the cleanest
    out["ratio_pool_over_plain_min"] = out["plain"]["min_step_s"] / out["pool"]["min_step_s"]
    if "ddp" in out:   # the whole stack against a plain torch DDP loop of the same model
        out["ratio_pool_over_ddp"] = out["pool"]["tokens_per_s"] / out["ddp"]["tokens_per_s"]
        out["ratio_pool_over_ddp_min"] = out["ddp"]["min_step_s"] / out["pool"]["min_step_s"]
    for which, ts in (cpu_times or {}).items():
        if ts and which in out:
            out[which]["median_cpu_s"] = statistics.median(ts)
    for other in ("plain", "ddp"):
        if "median_cpu_s" in out.get(other, {}) and "median_cpu_s" in out["pool"]:
            out[f"ratio_pool_over_{other}_cpu"] = (out[other]["median_cpu_s"]
                                                   / out["pool"]["median_cpu_s"])
    return out


def summarise_trainer(tr: dict) -> dict:
    out = {}
    for arm, ts in tr["step_times"].items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[arm] = {"steps": len(ts), "median_step_s": med, "min_step_s": min(ts),
                    "p25_step_s": q[0], "p75_step_s": q[2],
                    "tokens_per_s": tr["tokens_per_step"][arm] / med}
    S, m = tr["stages"], tr["micro_batches_per_step"]["m"]
    out["bubble_analytic"] = (S - 1) / (m + S - 1)
    if "2m" in out:
        for key, stat in (("median", "median_step_s"), ("min", "min_step_s")):
            t1, t2 = out["m"][stat], out["2m"][stat]
            a = (t2 - t1) / m          # seconds per micro-batch slot
            if a > 0:
                b = t1 / a - m         # fixed cost in micro-batch slots (bubble + overheads)
                out[f"fit_{key}"] = {"a_s_per_micro": a, "b_slots": b,
                                     "bubble_measured": b / (m + b)}
            else:
                out[f"fit_{key}"] = None
    return out


def print_trainer_table(results: list[dict]) -> None:
    rows = [r for r in results if "trainer" in r]
    if not rows:
        return
    print()
    print("Trainer route: apollo_ds.training.loop.Trainer.train_step, Apollo off (full depth), "
          "same model / micro / global batch in every layout")
    print(f"{'layout':<9} {'procs':>5} {'dp':>3} {'S':>2} {'m':>3} {'arm':<4} {'steps':>5} "
          f"{'median s/step':>13} {'IQR s':>15} {'min s':>7} {'tokens/s':>10}")
    for r in rows:
        tr = r["trainer"]
        ts = tr["summary"]
        for arm in tr["step_times"]:
            x = ts[arm]
            print(f"{r['layout']:<9} {r['world']:>5} {r['dp']:>3} {tr['stages']:>2} "
                  f"{tr['micro_batches_per_step'][arm]:>3} {arm:<4} {x['steps']:>5} "
                  f"{x['median_step_s']:>13.4f} "
                  f"{x['p25_step_s']:>7.4f}-{x['p75_step_s']:<7.4f} {x['min_step_s']:>7.4f} "
                  f"{x['tokens_per_s']:>10,.0f} {x.get('median_cpu_s', float('nan')):>10.4f}")
    print()
    print("pipeline bubble at the benchmark's m (micro-batches per step per pipeline); "
          "analytic = (S-1)/(m+S-1) for DeepSpeed's 1F1B TrainSchedule; measured = b/(m+b) "
          "from t(m) = a*(m+b) fitted to the m and 2m arms (b includes optimizer/all-reduce "
          "fixed costs: compare with the S=1 layouts)")
    for r in rows:
        tr = r["trainer"]
        ts = tr["summary"]
        m = tr["micro_batches_per_step"]["m"]
        line = (f"{r['layout']:<9} S={tr['stages']} m={m}: analytic {ts['bubble_analytic']:.3f}")
        for key in ("median", "min"):
            f = ts.get(f"fit_{key}", "absent")
            if f == "absent":
                continue
            if f is None:
                line += f" | measured ({key}s): fit failed (t(2m) <= t(m): too noisy)"
            else:
                line += (f" | measured ({key}s) {f['bubble_measured']:.3f} "
                         f"(a {f['a_s_per_micro']:.4f} s/micro-batch, b {f['b_slots']:.2f} slots)")
        print(line)
    base = next((r for r in rows if r["tp"] == 1 and r["pp"] == 1), rows[0])
    for r in rows:
        if r is base:
            continue
        bt, rt = base["trainer"]["summary"]["m"], r["trainer"]["summary"]["m"]
        print(f"trainer tokens/s {r['layout']} / {base['layout']} = "
              f"{rt['tokens_per_s'] / bt['tokens_per_s']:.3f} (medians; min-based "
              f"{bt['min_step_s'] / rt['min_step_s']:.3f}; same {r['world']} processes)")


def paired_ratio(step_times: dict, step_turns: dict) -> float | None:
    """Median over turns (each runs both models back to back) of plain_time / pool_time: each
    pair ran back to back, so a slow phase of a shared machine cancels within the pair."""
    blocks = {}
    for which in ("pool", "plain"):
        for t, turn in zip(step_times[which], step_turns[which]):
            blocks.setdefault(turn, {"pool": [], "plain": []})[which].append(t)
    ratios = [statistics.median(b["plain"]) / statistics.median(b["pool"])
              for b in blocks.values() if b["pool"] and b["plain"]]
    return statistics.median(ratios) if ratios else None


def print_table(results: list[dict]) -> None:
    print()
    results = [r for r in results if "summary" in r]
    if not results:
        return
    print(f"{'layout':<9} {'procs':>5} {'model':<6} {'steps':>5} {'median s/step':>13} "
          f"{'IQR s':>15} {'min s':>7} {'tokens/s':>10} {'CPU s/step':>10}")
    for r in results:
        s = r["summary"]
        for which in [k for k in ("pool", "plain", "ddp") if k in s]:
            x = s[which]
            print(f"{r['layout']:<9} {r['world']:>5} {which:<6} {x['steps']:>5} "
                  f"{x['median_step_s']:>13.4f} "
                  f"{x['p25_step_s']:>7.4f}-{x['p75_step_s']:<7.4f} {x['min_step_s']:>7.4f} "
                  f"{x['tokens_per_s']:>10,.0f} {x.get('median_cpu_s', float('nan')):>10.4f}")
        ok = "OK" if s["ratio_pool_over_plain"] >= 0.97 else "BELOW GOAL"
        print(f"{r['layout']:<9} {'':>5} pool/plain tokens/s = {s['ratio_pool_over_plain']:.3f} "
              f"(medians; paired {s['ratio_pool_over_plain_paired'] or float('nan'):.3f}, "
              f"min-based {s['ratio_pool_over_plain_min']:.3f}, "
              f"mean-based {s['ratio_pool_over_plain_mean']:.3f}, "
              f"CPU-time {s.get('ratio_pool_over_plain_cpu', float('nan')):.3f}; "
              f"goal >= 0.97: {ok}); "
              f"max |loss_pool - loss_other| = {r['max_loss_diff']:.2e}")
        if "ratio_pool_over_ddp" in s:
            print(f"{r['layout']:<9} {'':>5} pool/ddp tokens/s = {s['ratio_pool_over_ddp']:.3f} "
                  f"(medians; min-based {s['ratio_pool_over_ddp_min']:.3f}, CPU-time "
                  f"{s.get('ratio_pool_over_ddp_cpu', float('nan')):.3f}): the whole stack "
                  f"(DeepSpeed engine, pool) vs a plain torch DDP loop of the same model")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            rel = r["summary"]["pool"]["tokens_per_s"] / base["summary"]["pool"]["tokens_per_s"]
            print(f"pool tokens/s {r['layout']} / {base['layout']} = {rel:.3f} "
                  f"(same {r['world']} processes)")


def merge(parts: list[dict]) -> dict:
    r = dict(parts[0])
    if "trainer" in r:
        tr = dict(r["trainer"])
        arms = list(tr["step_times"])
        tr["step_times"] = {w: [t for p in parts for t in p["trainer"]["step_times"][w]]
                            for w in arms}
        tr["step_turns"] = {w: [t + 100000 * i for i, p in enumerate(parts)
                                for t in p["trainer"]["step_turns"][w]] for w in arms}
        tr.pop("losses", None)
        r["trainer"] = tr
    r["launches"] = len(parts)
    if "step_times" not in r:
        return r
    arms = list(r["step_times"])   # pool, plain and, when measured, ddp
    r["step_times"] = {w: [t for p in parts for t in p["step_times"][w]] for w in arms}
    if all("step_cpu_times" in p for p in parts):
        r["step_cpu_times"] = {w: [t for p in parts for t in p["step_cpu_times"][w]]
                               for w in arms}
    # keep turns distinct across launches so pairs never span two launches
    r["step_turns"] = {w: [t + 100000 * i for i, p in enumerate(parts)
                           for t in p["step_turns"][w]] for w in arms}
    r["max_loss_diff"] = max(p["max_loss_diff"] for p in parts)
    r["launches"] = len(parts)
    r.pop("losses", None)
    return r
