"""Command line: ``python -m cartlib <command>`` (also under ``accelerate launch -m cartlib``).

Stages of a full-scale run (each resumes what a killed run left)::

    accelerate launch -m cartlib train-tokenizer --config run/config.yaml --run-dir run
    accelerate launch -m cartlib extract-tokens  --config run/config.yaml --run-dir run
    accelerate launch -m cartlib train-ar        --config run/config.yaml --run-dir run
    accelerate launch -m cartlib sample          --config run/config.yaml --run-dir run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from cartlib import hardware, launch, runs, shipped, stages, train
from cartlib.apps import edit
from cartlib.cluster import Cluster
from cartlib.config import load_config, load_preset, save_config
from cartlib.data import BadFileError, DatasetUnavailableError, check_dataset
from cartlib.data.stream import source_for
from cartlib.data.synthetic import make_image_folder
from cartlib.interop.var import install_var_run
from cartlib.io import DiskFullError, LockTimeout, ReadOnlyError, dir_lock
from cartlib.rehearse import Row, peak_rss_gb, previous, rehearse
from cartlib.series import run_series
from cartlib.shards import ShardError
from cartlib.train.probe import run_probe

# errors whose message says what is wrong and what to do: printed without a traceback
USER_ERRORS = (
    ValueError, FileNotFoundError, DatasetUnavailableError, BadFileError, ShardError,
    DiskFullError, ReadOnlyError, LockTimeout, FloatingPointError,
)  # fmt: skip
EXIT_NOT_TRAINED = 3  # train-ar could not train here (the plan explains why)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cartlib", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-data", help="say whether a dataset can be loaded, and how to get it")
    p.add_argument("name", nargs="?", default="fashion-mnist")
    p = sub.add_parser("run-series", help="execute the notebook series with papermill")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    for stage, what in (
        ("train-tokenizer", "train the tokenizer"),
        ("extract-tokens", "encode a data split into token shards (needs a trained tokenizer)"),
        ("train-ar", "train the transformer (extracting the tokens first if needed)"),
        ("sample", "per-class samples as PNGs + the ADM evaluator's .npz (for FID)"),
    ):
        p = sub.add_parser(stage, help=f"{what}, from a config file (under accelerate launch)")
        p.add_argument("--config", required=True, help="a config.yaml written by cartlib")
        p.add_argument("--run-dir", required=True)
        if stage == "train-ar":
            p.add_argument(
                "--stop-after",
                type=int,
                default=None,
                help="train at most this many steps now, then checkpoint and exit 0 (the same "
                "command resumes): slices for a scheduler's time limit",
            )
        if stage == "extract-tokens":
            p.add_argument("--split", default="train", choices=("train", "test"))
            p.add_argument(
                "--redo-bad",
                action="store_true",
                help="re-encode the shards that fail their checks (the good ones are kept)",
            )
        if stage == "sample":
            # unset: the config's `sample` section (the full-scale presets hold VAR's FID setting)
            p.add_argument("--per-class", type=int, default=None)
            p.add_argument("--batch", type=int, default=50, help="images per chunk (one seed)")
            p.add_argument("--guidance", type=float, default=None, help="CFG scale")
            p.add_argument("--cfg-schedule", default=None, choices=("linear", "constant"))
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--temperature", type=float, default=None)
            p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser(
        "ship", help="export a finished run's tokenizers and transformers into cartlib/shipped"
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--dataset", default=None, help="default: the preset's")
    p.add_argument("--run-dir", default=None, help="default: papermill_runs/<preset>")
    p.add_argument(
        "--for",
        dest="notebooks",
        choices=("03-07", "09"),
        default="03-07",
        help="03-07: the tokenizers of Figure 11, CART and VAR; 09: the intrinsic and specular "
        "CARTs at notebook 09's defaults",
    )
    p = sub.add_parser(
        "import-var",
        help="install VAR's released VQ-VAE and transformer (.pth) as a run's finished stages",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", help="var-d16-256 ... var-d30-256")
    which.add_argument("--config", help="or a config.yaml of such a run")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--vae", required=True, help="vae_ch160v4096z32.pth")
    p.add_argument("--var", required=True, help="var_d16.pth ... var_d30.pth")
    p.add_argument("--num-classes", type=int, default=1000)
    p = sub.add_parser(
        "rehearse",
        help="rehearse a full-scale launch here: the plan, then every stage in local processes "
        "standing in for the machines, a killed rank, a resume (cartlib.rehearse)",
    )
    p.add_argument("--preset", required=True, help="cart-d30-256, var-d30-256, cart-d16-256, ...")
    p.add_argument("--num_machines", "--num-machines", type=int, default=2)
    p.add_argument("--gpus_per_machine", "--gpus-per-machine", type=int, default=8)
    p.add_argument("--gpu_memory", "--gpu-memory", type=float, default=80, help="GB per GPU")
    p.add_argument("--data-root", default=None, help="the ImageNet folder (else synthetic images)")
    p.add_argument("--run-dir", default=None, help="default: papermill_runs/rehearse-<preset>")
    p.add_argument("--quick", action="store_true", help="~2 minutes: fewer processes and steps")
    p = sub.add_parser(
        "probe-device", help="exit 0 when a device runs every op cartlib trains and samples with"
    )
    p.add_argument("device", help="cpu, cuda or mps")
    p = sub.add_parser("synthetic-data", help="write a synthetic image folder (tests, benchmarks)")
    p.add_argument("root")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--val-images", type=int, default=0)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return parser


def _stage(args) -> int:
    cfg = load_config(args.config)
    if runs.process_state().is_main_process:
        print(hardware.describe(cfg.mixed_precision), flush=True)
    if args.command == "train-tokenizer":
        source_for(cfg.data, "train")  # a missing or bad data root fails here, before any write
        runs.ensure_tokenizer(cfg, args.run_dir)
    elif args.command == "extract-tokens":
        source = source_for(cfg.data, args.split)  # a missing or bad data root fails here, first
        run_dir = runs.resolve_run_dir(args.run_dir)
        cfg = stages.settle("tokenizer", cfg, run_dir)  # the tokenizer's folder, any precision
        tok = stages.trained("tokenizer", cfg, run_dir)
        main = runs.process_state().is_main_process  # one extraction per folder at a time
        folder = train.tokenizer_dir(run_dir, cfg)
        with dir_lock(folder, "extract-tokens") if main else contextlib.nullcontext():
            stages.extract_shards(cfg, run_dir, tok, args.split, source, redo_bad=args.redo_bad)
    elif args.command == "train-ar":
        plan = runs.plan_ar(cfg, args.run_dir, write=False)  # the cluster it was launched into
        plan.problems = launch.agreed_problems(plan.problems)  # what any machine found
        if plan.problems:  # e.g. a full-scale config on a machine without GPUs or data
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # once per machine
                launch.explain(plan)
            return EXIT_NOT_TRAINED
        runs.ensure_ar(plan.config, args.run_dir, stop_after=args.stop_after)  # the plan's layout
    else:
        given = {k: getattr(args, k) for k in ("guidance", "cfg_schedule", "top_k", "top_p")}
        given["temperature"] = args.temperature
        cfg = cfg.updated(sample={k: v for k, v in given.items() if v is not None})
        run_dir = runs.resolve_run_dir(args.run_dir)
        stages.sample_images(cfg, run_dir, args.per_class, args.batch, args.seed)
    return 0


def _from_here(args: argparse.Namespace) -> argparse.Namespace:
    """Paths given on the command line are relative to the current folder, as every command's
    are (``--run-dir run`` from ``~/exp`` is ``~/exp/run``; cartlib's own rule, relative to the
    project, is for the notebooks' ``run_dir`` parameter)."""
    for name in ("run_dir", "config", "vae", "var", "root"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, str(Path(value).expanduser().absolute()))
    return args


def main(argv: list[str] | None = None) -> int:
    args = _from_here(_parser().parse_args(argv))
    if args.command == "check-data":
        return check_dataset(args.name)
    if args.command == "run-series":
        return run_series(args.preset, only=args.only)
    if args.command == "ship":
        cfg = load_preset(args.preset)
        cfg = cfg if args.dataset is None else cfg.updated(data={"dataset": args.dataset})
        if args.notebooks == "09":  # the intrinsic and specular CARTs notebook 09 opens
            cfgs = {f"ar:{k}": c for k, c in edit.factor_configs(cfg).items()}
        else:  # what notebooks 03 (Figure 11's tokenizers) and 05-07 (CART, VAR) load
            cfgs = {**cfg.tokenizer_variants(), "ar:CART": cfg, "ar:VAR": cfg.var_baseline()}
        run_dir = args.run_dir or f"papermill_runs/{args.preset}"
        shipped.ship(cfgs, runs.resolve_run_dir(run_dir), args.preset)
        return 0
    if args.command == "probe-device":
        try:
            run_probe(args.device)
        except (NotImplementedError, RuntimeError, TypeError) as e:
            print(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            return 1
        print(f"{args.device}: every operation cartlib uses runs", flush=True)
        return 0
    if args.command == "import-var":
        return _import_var(args)
    if args.command == "rehearse":
        return _rehearse(args)
    if args.command == "synthetic-data":
        make_image_folder(args.root, args.images, args.val_images, args.classes, seed=args.seed)
        return 0
    try:
        code = _stage(args)
    except USER_ERRORS as e:
        print(f"cartlib {args.command}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return launch.fail_fast(1)
    except KeyboardInterrupt as e:  # Ctrl-C; training saved its step first (train.stopping)
        print(f"cartlib {args.command}: {e or 'interrupted'}", file=sys.stderr, flush=True)
        return launch.fail_fast(130)
    except BaseException:  # a traceback, then every other process must stop too
        traceback.print_exc()
        return launch.fail_fast(1)
    launch.leave_process_group()
    return code


def _rehearse(args) -> int:
    """``rehearse``: :func:`cartlib.rehearse.rehearse`, then notebook 04's closing cells on the
    rehearsed run (papermill, ``-p rehearse``); the table; exit 0 when every step passed."""
    import papermill as pm  # the notebook runner, imported where it runs

    world = args.num_machines * args.gpus_per_machine
    data = {"root": args.data_root} if args.data_root else {}
    try:
        cfg = load_preset(args.preset, num_processes=world, gpu_mem_gib=args.gpu_memory, data=data)
        cluster = Cluster(world, args.num_machines, 0, "<address of machine 0>")
    except ValueError as e:
        print(f"cartlib rehearse: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    run_dir = runs.resolve_run_dir(args.run_dir or f"papermill_runs/rehearse-{args.preset}")
    mode = "quick" if args.quick else "full"
    report = rehearse(cfg, cluster, run_dir, mode, args.data_root)
    if report.ok:
        t0, out = time.time(), report.run_dir / "04_train_ar.ipynb"
        params = {"preset": args.preset, "num_processes": world, "gpu_mem_gib": args.gpu_memory,
                  "num_machines": args.num_machines, "data_root": args.data_root,
                  "rehearse": mode, "run_dir": str(run_dir), "progress": False}  # fmt: skip
        try:
            notebook = runs.project_root() / "notebooks" / "04_train_ar.ipynb"
            pm.execute_notebook(
                notebook, out, parameters=params, kernel_name="cartlib", progress_bar=False
            )
            row = Row("notebook 04", True, time.time() - t0, f"its closing cells ran: {out}")
        except Exception as e:  # papermill's error names the cell
            row = Row("notebook 04", False, time.time() - t0, str(e).strip().splitlines()[-1])
        report = previous(cfg, cluster, run_dir, mode) or report  # as the notebook left it
        row.peak_gb = peak_rss_gb()  # the notebook's kernel is a finished child by now
        report.rows.append(row)
        report.save()
    print(report.table(), flush=True)
    return 0 if report.ok else 1


def _import_var(args) -> int:
    """``import-var``: VAR's weights into a run directory, then the command that samples them."""
    run_dir = runs.resolve_run_dir(args.run_dir, create=False)  # made once both files read
    try:
        cfg = load_preset(args.preset) if args.preset else load_config(args.config)
        tok_dir, ar_dir = install_var_run(cfg, run_dir, args.vae, args.var, args.num_classes)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"cartlib import-var: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    save_config(cfg, run_dir / "config.yaml")
    print(f"installed VAR's tokenizer into {tok_dir}\nand its transformer into {ar_dir}")
    print(f"sample (50 per class, VAR's FID setting):\n  accelerate launch --multi_gpu -m "
          f"cartlib sample --config {run_dir / 'config.yaml'} --run-dir {run_dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
