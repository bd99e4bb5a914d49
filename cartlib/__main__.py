"""Command line: ``python -m cartlib <command>`` (also under ``accelerate launch -m cartlib``)."""

from __future__ import annotations

import argparse
import sys

from cartlib import launch, runs
from cartlib.config import load_config
from cartlib.data import check_dataset
from cartlib.series import run_series

EXIT_NOT_TRAINED = 3  # train-ar could not train here (the plan explains why)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cartlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-data", help="say whether a dataset can be loaded, and how to get it")
    p.add_argument("name", nargs="?", default="fashion-mnist")
    p = sub.add_parser("run-series", help="execute the notebook series with papermill")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    for stage in ("train-tokenizer", "train-ar"):
        p = sub.add_parser(stage, help=f"{stage} from a config file (under accelerate launch)")
        p.add_argument("--config", required=True, help="a config.yaml written by cartlib")
        p.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)

    if args.command == "check-data":
        return check_dataset(args.name)
    if args.command == "run-series":
        return run_series(args.preset, only=args.only)
    if args.command in ("train-tokenizer", "train-ar"):
        cfg = load_config(args.config)
        if args.command == "train-tokenizer":
            runs.ensure_tokenizer(cfg, args.run_dir)
            return 0
        plan = launch.plan_ar(cfg, args.run_dir)
        if plan.mode == "explain":  # e.g. a full-scale config on a machine without GPUs
            launch.explain(plan)
            return EXIT_NOT_TRAINED
        runs.ensure_ar(cfg, args.run_dir)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
