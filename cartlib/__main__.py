"""Command line: ``python -m cartlib <command>`` (also under ``accelerate launch -m cartlib``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cartlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-data", help="say whether a dataset can be loaded, and how to get it")
    p.add_argument("name", nargs="?", default="fashion-mnist")
    p = sub.add_parser("run-series", help="execute the notebook series with papermill")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    args = parser.parse_args(argv)

    if args.command == "check-data":
        from cartlib.data import check_dataset

        return check_dataset(args.name)
    if args.command == "run-series":
        from cartlib.series import run_series

        return run_series(args.preset, only=args.only)
    return 2


if __name__ == "__main__":
    sys.exit(main())
