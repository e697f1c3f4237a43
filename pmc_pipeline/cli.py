"""The `pmc` command line: `pmc <command> <config> [key=value ...]`.

User errors (bad config, missing files or columns) print one line and exit with status 2; SIGINT
and SIGTERM stop the job's actors at once, print one line saying where it stopped, and exit with
128 + the signal's number (130, 143).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from pmc_pipeline.errors import Interrupted, PMCError, raise_on_stop_signals


def _finetune(args: argparse.Namespace) -> None:
    from pmc_pipeline.config import load_config
    from pmc_pipeline.recipes.finetune import run_finetune

    run_finetune(load_config("finetune", args.config, args.overrides))


def _unlearn(args: argparse.Namespace) -> None:
    from pmc_pipeline.config import load_config
    from pmc_pipeline.recipes.unlearn import check_unlearn, run_unlearning

    cfg = load_config("unlearn", args.config, args.overrides)
    result = run_unlearning(cfg, inputs=check_unlearn(cfg))
    print(f"unlearned checkpoint: {result.checkpoint}\nmetrics: {result.run_dir / 'metrics.jsonl'}")


def _sweep(args: argparse.Namespace) -> None:
    from pmc_pipeline.recipes.sweep import run_sweep

    run_sweep(args.config, args.overrides)


def _tofu_real(args: argparse.Namespace) -> None:
    from pmc_pipeline.recipes.tofu_real import load_tofu_real_config, run_tofu_real

    cfg = load_tofu_real_config(args.config, args.overrides)
    run_tofu_real(cfg)
    out = Path(cfg.out_dir)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"written: {out / 'results.md'}, results.json, curves.png, pareto.png, comparison.png")


def _demo(args: argparse.Namespace) -> None:
    from pmc_pipeline.recipes.demo import load_demo_config, run_demo

    run_demo(load_demo_config(args.config, args.overrides))


def _check(args: argparse.Namespace) -> None:
    from pmc_pipeline.recipes.check import print_check

    print_check(args.config, args.overrides)


def _evaluate(args: argparse.Namespace) -> None:
    from pmc_pipeline.recipes.evaluate import load_evaluate_config, run_evaluation

    result = run_evaluation(load_evaluate_config(args.config, args.overrides))
    print(f"\n{result.table}\n\nwritten: {result.output_dir} (eval.json, report.md, side_effects.json, settings.json)")


def _plot(args: argparse.Namespace) -> None:
    from pmc_pipeline.eval.plots import plot_runs

    # `pmc plot RUN [RUN ...] [out=DIR]`: argparse files the extra run dirs under overrides
    items = [args.config, *args.overrides]
    options = dict(i.split("=", 1) for i in items if "=" in i)
    unknown = sorted(set(options) - {"out"})
    if unknown:
        raise PMCError(f"unknown option(s) {', '.join(unknown)}; `pmc plot` takes run dirs and out=DIR")
    runs = [i for i in items if "=" not in i]
    out = options.get("out") or (str(Path(runs[0]) / "plots") if len(runs) == 1 else "plots")
    for path in plot_runs(runs, out):
        print(path)


def _make_tiny(args: argparse.Namespace) -> None:
    from pmc_pipeline.models.families import FAMILIES, make_tiny_family

    # `pmc make-tiny <family> <dir>`: argparse files the dir under overrides
    if len(args.overrides) != 1 or "=" in args.overrides[0]:
        raise PMCError(f"usage: pmc make-tiny <family> <dir> (family: {', '.join(FAMILIES)})")
    print(make_tiny_family(args.config, args.overrides[0]))


def _bench(args: argparse.Namespace) -> None:
    from pmc_pipeline.bench.runner import run_bench
    from pmc_pipeline.config import load_config

    run_bench(load_config("bench", None, [f"demo={args.config}", *args.overrides]))


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, str | None]] = {
    "finetune": (_finetune, "SFT of a causal LM on question/answer data (DeepSpeed ZeRO-3)", None),
    "unlearn": (_unlearn, "PMC-unlearning: vLLM rollouts, reward, ZeRO-3 training, weight push (Ray)", None),
    "sweep": (_sweep, "a grid of `pmc unlearn` trials on Ray Tune, then a table and the Pareto plot: `pmc sweep "
                      "<unlearn config> key=a,b other=x,y [seeds=K] [max_concurrent=N] [sweep_dir=DIR]`", None),
    "demo": (_demo, "the whole pipeline, small, on generated data: `pmc demo [tiny|smollm2]`", "tiny"),
    "tofu-real": (_tofu_real, "unlearning methods on a real model and real TOFU authors from one fine-tuned "
                              "checkpoint, every model evaluated, one results table: `pmc tofu-real "
                              "[smollm2-neighbours|smollm2|smollm2-compare|...] tofu_dir=DIR` (default: PMC beside "
                              "PMC keeping the neighbours, configs/tofu_real/)", "smollm2-neighbours"),
    "check": (_check, "validate a finetune/unlearn config; print its placement and per-GPU memory estimate "
                      "(starts nothing)", None),
    "evaluate": (_evaluate, "TOFU metrics, sampling/prefill attacks, leakage probes of a checkpoint: "
                            "`pmc evaluate <checkpoint or run dir> [key=value ...]`", None),
    "plot": (_plot, "unlearn quality / utility curves and Pareto view as PNG: "
                    "`pmc plot <run dir> [<run dir> ...] [out=DIR]`", None),
    "make-tiny": (_make_tiny, "a random-init, CPU-sized checkpoint of a shipped model family for tests: "
                              "`pmc make-tiny <llama-3.2|phi-1.5|gemma-3> <new dir>`", None),
    "bench": (_bench, "speed figures: vLLM vs HF generate, reward, ZeRO-3 trainer, weight push, PMC epoch "
                      "vs the reference's way: `pmc bench [tiny] [key=value ...]`", "tiny"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmc", description="Unlearning in LLMs by Partial Model Collapse.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, default) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if default is None:
            cmd.add_argument("config", help="a YAML file, or a name under configs/ (e.g. unlearn/phi-1.5)")
        else:
            cmd.add_argument("config", nargs="?", default=default, help=f"which one (default: {default})")
        cmd.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default = COMMANDS[args.command][2]
    if default is not None and "=" in args.config:  # `pmc tofu-real tofu_dir=D`: argparse took the first override
        args.config, args.overrides = default, [args.config, *args.overrides]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise_on_stop_signals()
    try:
        COMMANDS[args.command][0](args)
    except PMCError as exc:
        if args.verbose:
            raise
        print(f"pmc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"pmc {args.command}: {exc}", file=sys.stderr)
        return 128 + exc.signal_number
    return 0


if __name__ == "__main__":
    sys.exit(main())
