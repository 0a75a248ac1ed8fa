"""Console report of benchmarks/gpu_check.py (its MFU is taken against the dense bf16 peaks
of apollo_ds.training.metrics). Kept apart from the phases so the table can be re-printed from a saved JSON
(``python benchmarks/gpu_check_report.py runs/gpu_check.json``) without torch."""
from __future__ import annotations

import json
import math
import os
import sys

# The dense bf16 peaks (by device name) are the training log's: one table for the step line's
# MFU and this report's.
from apollo_ds.training.metrics import PEAK_BF16_TFLOPS, peak_for  # noqa: E402,F401


def fmt(x, spec: str, na: str = "n/a") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return na
    return format(x, spec)


def print_table(res: dict) -> None:
    ph = {k: v for k, v in res["phases"].items() if "error" not in v}
    m = res["shape"]["model"]
    print()
    print(f"gpu_check on {res['device']} ({'smoke, CPU' if res['smoke'] else 'CUDA'}); torch "
          f"{res['versions']['torch']}, deepspeed {res['versions']['deepspeed']}")
    print(f"peak used for MFU: {fmt(res['peak_tflops'], '.0f')} TFLOP/s dense bf16 "
          f"({res['peak_source']})")
    print(f"model {m['layers']} x {m['hidden']}, {m['heads']} heads, seq {m['seq_len']}, vocab "
          f"{m['vocab_size']}; micro {res['shape']['micro']} global "
          f"{res['shape']['global_batch']}; {res['shape']['ds_config']} unless named; MFU counts "
          f"model FLOPs (matmuls, no recompute)")
    print(f"{'phase':<46} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}  notes")

    def row(name, tps, tf, mfu, mem, note=""):
        print(f"{name:<46} {fmt(tps, ',.0f'):>11} {fmt(tf, '.1f' if tf and tf >= 1 else '.4f'):>8}"
              f" {fmt(mfu, '.1%'):>6} {fmt(mem, '.2f'):>9}  {note}")

    for key, x in ph.items():
        if key.startswith("tput_") and "error" not in x:
            what = [f"recompute {x['recompute']}", "compiled" if x.get("compile") else "eager",
                    x.get("arch", "gpt2"), os.path.basename(x.get("ds_config", ""))[:-5]]
            row(", ".join(what), x["tokens_per_s"], x["model_tflops"], x["mfu"],
                x["peak_mem_gib"], f"median {x['median_step_s']:.4f} s/step")
    x = ph.get("pool_vs_plain")
    if x:
        row("pool (layer map [0..L-1])", x["pool"]["tokens_per_s"], x["pool"]["model_tflops"],
            x["pool"]["mfu"], x["peak_mem_gib_both_engines"], "peak: both engines")
        row("plain GPT, same engine", x["plain"]["tokens_per_s"], x["plain"]["model_tflops"],
            x["plain"]["mfu"], None,
            f"pool/plain {x['ratio_pool_over_plain']:.3f} (paired "
            f"{fmt(x['ratio_pool_over_plain_paired'], '.3f')}, min "
            f"{x['ratio_pool_over_plain_min']:.3f}); max |dloss| {x['max_loss_diff']:.1e}")
    x = ph.get("apollo")
    if x:
        ex = "; ".join(f"{e['from']}->{e['to']} {e['seconds']:.2f} s = "
                       f"{e['in_median_steps']:.1f} steps" for e in x["expansions"])
        row(f"apollo {x['stages']}, {x['steps']} steps", x["tokens_per_s"], x["model_tflops"],
            x["mfu"], x["peak_mem_gib"], f"expansions: {ex}")
    x = ph.get("resume")
    if x:
        row(f"resume {x['steps']} vs {x['stop_after']}+stop+resume", x["tokens_per_s"], None,
            None, x["peak_mem_gib"],
            f"max |dloss| {x['max_abs_loss_diff']!r} ({x['determinism']}, "
            f"{x['attention_kernel']}), eval diff {x['eval_loss_diff']!r}")
    for k, v in res["phases"].items():
        if "error" in v:
            print(f"{k:<46} FAILED: {v['error'][:300]}")
    print(f"total {res['elapsed_s']:.0f} s; phases: " +
          ", ".join(f"{k} {v:.0f} s" for k, v in res["phase_wall_s"].items()))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print_table(json.load(f))
