"""``apollo-ds`` console script.

    apollo-ds plan --config configs/X.yaml [section.key=value ...] [--json]
    apollo-ds eval --checkpoint DIR (--data PREFIX [--split 98,2,0] | --text FILE...) [--json]
    apollo-ds generate --checkpoint DIR (--prompt TEXT ... | --prompts FILE) [--max-new-tokens N]
        [--temperature T --top-k K --top-p P --seed S] [--repetition-penalty R] [--batch B]
    apollo-ds config [SECTION ...] [--config configs/X.yaml] [--json]
    apollo-ds preprocess | train-tokenizer | fetch-corpus ...   (the data tools; --help each)

``eval`` and ``generate`` take a run's train.out_dir (any layout), a checkpoint tag directory
or a Hugging Face export (apollo_ds.convert.to_hf) and run in this one process.

``plan`` prints the stage schedule of a run (unique layers, step ranges, the exact depth
distribution of each stage) and the expected training FLOPs relative to full-depth training.
It needs no data, tokenizer or DeepSpeed config, so it validates with check_files=False.
Configuration errors print one line to stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from apollo_ds.apollo import StageSchedule
from apollo_ds.config import ConfigError, RunConfig, load_config, validate
from apollo_ds.flops import train_flops


def plan_summary(cfg: RunConfig) -> dict:
    """The plan as plain data (the --json output). ``cfg`` must be validated."""
    sched = StageSchedule(cfg)
    m, t = cfg.model, cfg.train
    L = m.layers
    tokens_per_step = t.global_batch * m.seq_len
    full = train_flops(m, L, tokens_per_step, cfg.parallel.tp)
    stages, run_flops = [], 0.0
    for k in range(sched.num_stages):
        pmf = sched.stage_pmf(k)
        # expected per-step FLOPs: train_flops is affine in depth, so average over the pmf
        step_flops = sum(p * train_flops(m, d, tokens_per_step, cfg.parallel.tp)
                         for d, p in pmf.items())
        start, end = sched.start_step(k), sched.end_step(k)
        run_flops += (end - start + 1) * step_flops
        stages.append({
            "index": k,
            "unique": sched.unique[k],
            "start_step": start,
            "end_step": end,
            "depth_pmf": {str(d): p for d, p in pmf.items()},
            "expected_depth": sched.stage_expected_depth(k),
            "relative_flops": step_flops / full,
        })
    return {
        "layers": L,
        "enabled": sched.enabled,
        "sampler": cfg.apollo.sampler,
        "grow": cfg.apollo.grow,
        "steps": t.steps,
        "tokens_per_step": tokens_per_step,
        "stages": stages,
        "full_depth_flops": full * t.steps,
        "expected_flops": run_flops,
        "relative_flops": run_flops / (full * t.steps),
    }


def _format_plan(s: dict) -> str:
    mode = (f"Apollo on, sampler {s['sampler']}, grow {s['grow']}" if s["enabled"]
            else "Apollo off (full depth)")
    lines = [f"plan: L={s['layers']} layers, {s['steps']} steps, "
             f"{s['tokens_per_step']} tokens/step, {mode}",
             f"{'stage':>5} {'unique':>6} {'steps':>15} {'E[d]':>6} {'rel.FLOPs':>9}  "
             f"depth pmf (d:p)"]
    for st in s["stages"]:
        pmf = " ".join(f"{d}:{p:.3f}" for d, p in st["depth_pmf"].items())
        rng = f"{st['start_step']}-{st['end_step']}"
        lines.append(f"{st['index']:>5} {st['unique']:>6} {rng:>15} "
                     f"{st['expected_depth']:>6.2f} {st['relative_flops']:>9.3f}  {pmf}")
    rel = s["relative_flops"]
    lines.append(f"expected training FLOPs relative to full depth: {rel:.4f} "
                 f"(saving {100 * (1 - rel):.1f}%)")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate(cfg, check_files=False)      # plan needs no data / tokenizer / DeepSpeed files
    summary = plan_summary(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format_plan(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from apollo_ds.downstream import evaluate as ev
    from apollo_ds.downstream.models import load
    if (args.data is None) == (not args.text):
        raise ConfigError("give held-out text as --data PREFIX (an indexed dataset: its "
                          "validation split) or --text FILE... (one document per line)")
    model = load(args.checkpoint, args.tokenizer)
    if args.data:
        stream = ev.dataset_stream(args.data, args.split, args.which)
        source = f"{args.data} ({args.which} split of {args.split})"
    else:
        stream = []
        for doc in ev.text_documents(args.text):
            stream += model.encode(doc) + ([model.eod] if model.eod is not None else [])
        source = " ".join(args.text)
    r = ev.evaluate(model, stream, args.batch, args.max_windows, progress=not args.json)
    r["data"] = source
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{model.kind} model {model.name} on {source}: loss {r['loss']:.4f}, perplexity "
              f"{r['perplexity']:.2f} over {r['tokens']} tokens ({r['windows']} windows of "
              f"{model.seq_len})")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from apollo_ds.settings_doc import format_settings, settings
    rows = settings()
    if args.section:
        known = sorted({r["name"].split(".")[0] for r in rows})
        rows = [r for r in rows if r["name"].split(".")[0] in args.section]
        if not rows:
            raise ConfigError(f"no section {' '.join(args.section)}; choose from "
                              f"{', '.join(known)}")
    values = None
    if args.config:
        cfg = load_config(args.config, [])
        values = {f"{sec}.{k}": v for sec, d in cfg.to_dict().items() for k, v in d.items()}
    if args.json:
        print(json.dumps([r | ({"value": values[r["name"]]} if values else {}) for r in rows],
                         indent=1))
    else:
        print(format_settings(rows, values))
    return 0


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    for path in args.prompts or []:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [ln.rstrip("\n").replace("\\n", "\n") for ln in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--prompts {path}: cannot read it ({e})") from None
        found = [ln for ln in lines if ln.strip()]
        if not found:
            raise ConfigError(f"--prompts {path} holds no prompts (one a line)")
        prompts += found
    if not prompts:
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE (one a line)")
    for p in prompts:
        if not p.strip():
            raise ConfigError("--prompt '': a prompt must have some text")
    return prompts


def _cmd_generate(args: argparse.Namespace) -> int:
    from apollo_ds.downstream.generate import check_options, generate_batch
    from apollo_ds.downstream.models import load
    # bad options are refused before the (slow) model load
    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                  args.repetition_penalty)
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch}: must be >= 1")
    prompts = _prompts(args)
    model = load(args.checkpoint, args.tokenizer)
    out = []
    for i in range(0, len(prompts), args.batch):
        out += generate_batch(model, prompts[i:i + args.batch], args.max_new_tokens,
                              args.temperature, args.top_k, args.top_p, args.seed + i,
                              repetition_penalty=args.repetition_penalty,
                              use_cache=not args.no_cache)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for r in out:
            print(f"{r['prompt']}{r['text'] if r['text'][:1] in ('', ' ') else ' ' + r['text']}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run's train.out_dir, a checkpoint tag directory, or an exported "
                        "Hugging Face directory")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer of a native checkpoint (default: the run's data.tokenizer)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apollo-ds",
                                description="Apollo progressive GPT pretraining tools")
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", help="print the stage schedule, depth distributions and "
                                     "expected FLOPs of a config")
    pl.add_argument("--config", default=None, help="YAML preset (configs/*.yaml)")
    pl.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="config overrides, e.g. model.layers=6 apollo.stages=[1,3,6]")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=_cmd_plan)
    co = sub.add_parser("config", help="list every setting with its default and meaning")
    co.add_argument("section", nargs="*", help="only these sections (model, apollo, ...)")
    co.add_argument("--config", default=None, help="also show this YAML preset's values")
    co.add_argument("--json", action="store_true", help="print the settings as JSON")
    co.set_defaults(func=_cmd_config)
    ev = sub.add_parser("eval", help="mean loss and perplexity of a checkpoint or export on "
                                     "held-out text")
    _model_args(ev)
    ev.add_argument("--data", metavar="PREFIX", help="indexed dataset (PREFIX.bin/.idx)")
    ev.add_argument("--split", default="98,2,0", help="train,valid,test document weights "
                                                      "(the run's data.split; default 98,2,0)")
    ev.add_argument("--which", default="valid", choices=("train", "valid", "test"))
    ev.add_argument("--text", nargs="+", metavar="FILE", help="text files, one document a line")
    ev.add_argument("--batch", type=int, default=8, help="windows per forward (default 8)")
    ev.add_argument("--max-windows", type=int, default=None, help="evaluate at most N windows")
    ev.set_defaults(func=_cmd_eval)
    ge = sub.add_parser("generate", help="continue prompts, greedy or sampled")
    _model_args(ge)
    ge.add_argument("--prompt", action="append", help="repeat for several")
    ge.add_argument("--prompts", action="append", metavar="FILE",
                    help="a file of prompts, one a line (a literal \\n is a newline)")
    ge.add_argument("--batch", type=int, default=8, help="prompts decoded together (default 8)")
    ge.add_argument("--no-cache", action="store_true",
                    help="re-run the whole context every token (no key/value cache)")
    ge.add_argument("--max-new-tokens", type=int, default=32)
    ge.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ge.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    ge.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1: all)")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed+i)")
    ge.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide the logits of tokens already in the context (HF's "
                         "repetition_penalty; 1: none)")
    ge.set_defaults(func=_cmd_generate)
    for name, (_, what) in DATA_TOOLS.items():    # listed in --help; run by main() itself
        sub.add_parser(name, help=what, add_help=False)
    return p


# The data tools keep their own option parsers (also run as data_prep/*.py scripts).
DATA_TOOLS = {"preprocess": ("apollo_ds.data.prep.preprocess",
                             "tokenize text files/folders/globs into an indexed dataset"),
              "train-tokenizer": ("apollo_ds.data.prep.train_tokenizer",
                                  "train a SentencePiece or byte-level BPE tokenizer"),
              "fetch-corpus": ("apollo_ds.data.prep.fetch_corpus",
                               "build the default public-domain text corpus")}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (argparse usage errors exit 2 themselves)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DATA_TOOLS:
        import importlib
        tool = importlib.import_module(DATA_TOOLS[argv[0]][0])
        return tool.main(argv[1:], prog=f"apollo-ds {argv[0]}")
    parser = _parser()
    # parse_known_args: overrides may come after --json too (argparse alone would refuse a
    # positional split by an option); anything left that looks like an option is an error.
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x or args.command != "plan"]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"apollo-ds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
