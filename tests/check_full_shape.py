"""Full-shape smoke of the full-scale presets on a CPU: ``make check-full`` (~45 min, ~15 GB RAM).

Shapes, dtypes and file formats must break here, not on the cluster. For cart-d16-256 and
var-d16-256, at their real resolution (256²), tokenizer architecture (VAR's 109 M-parameter
VQ-VAE, LPIPS, discriminator), token schedule and d16 transformer, two steps of every stage run
through the command line exactly as a cluster runs them (``CARTLIB_FULL_SCALE_ON_CPU=1``, one
process, fp32): ``train-tokenizer`` -> ``extract-tokens`` -> ``train-ar`` -> ``sample`` -> FID of
the samples against an ADM-style reference batch made from the validation images. Every other
full-scale preset (d20-d36, 512²) is built on the meta device: tokenizer, transformer, schedule,
the transformer's and the tokenizer's memory plans on 16 x 80 GB.

Then, on those two run folders, the paper's items a researcher regenerates from a trained
full-scale run, through papermill exactly as README's "Paper figures from a run folder" says:
notebook 05 draws Fig. 3 and Table 1's row (FID against the reference batch), notebook 07 Fig. 5
(VAR beside CART, same classes and seed) and Fig. 10, each written as ``<run>/paper/<item>_<model>``
(untrained weights: only that every path runs at 256² and writes its file, so the notebooks'
claims about trained models are off, ``-p check_claims False``).

    python tests/check_full_shape.py [--only cart-d16-256] [--keep DIR]

``--keep DIR`` works in DIR and keeps it (a second call reuses the finished stages). Exits non-zero
on the first failure. Not part of ``make test`` (it takes minutes and ~14 GB);
tests/test_data_scale.py covers the same code paths at small width in seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cartlib import launch, train
from cartlib.__main__ import main as cli
from cartlib.config import load_preset, save_config
from cartlib.data.synthetic import make_image_folder
from cartlib.fit import tokenizer_activation_probe
from cartlib.metrics import fid_against_adm
from cartlib.model import build_model
from cartlib.series import KERNEL
from cartlib.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

RUN = ("cart-d16-256", "var-d16-256")
META = ("cart-d20-256", "cart-d24-256", "cart-d30-256", "cart-d30-512", "var-d20-256",
        "var-d24-256", "var-d30-256", "var-d30-512", "var-d36-s-512")  # fmt: skip
TWO_STEPS = {"steps": 2, "batch_size": 2, "ckpt_every": 1}


def full_shape_config(preset: str, root: Path):
    """``preset`` as it is, but for 2 steps of batch 2 on one CPU process in fp32 (the
    tokenizer's discriminator on from its first step, so its path runs too) and 2 extracted
    views per image instead of 16 (the shards' shape is checked all the same)."""
    return load_preset(
        preset,
        data={"root": str(root), "workers": 0, "shard_size": 4, "test_limit": 8, "views": 2},
        tokenizer={**TWO_STEPS, "gan_start": 0},
        ar={**TWO_STEPS, "warmup": 1},
        sample={"per_class": 1},
        mixed_precision="no",
        num_processes=1,
    )


def stage(*args: str) -> float:
    t0 = time.perf_counter()
    code = cli([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"FAILED: python -m cartlib {' '.join(map(str, args))} -> exit {code}")
    return time.perf_counter() - t0


def run_stages(preset: str, work: Path, root: Path, reference: Path) -> None:
    cfg = full_shape_config(preset, root)
    run_dir = work / preset
    run_dir.mkdir(exist_ok=True)
    config = run_dir / "config.yaml"
    save_config(cfg, config)
    common = ("--config", config, "--run-dir", run_dir)
    took = {
        "train-tokenizer": stage("train-tokenizer", *common),
        "extract-tokens": stage("extract-tokens", *common),
        "train-ar": stage("train-ar", *common),
        "sample": stage("sample", *common, "--per-class", 1, "--batch", 2),
    }
    tok_dir = train.tokenizer_dir(run_dir, cfg)
    ar_dir = train.ar_dir(run_dir, cfg)
    samples = next(ar_dir.glob("samples-*/samples.npz"))
    images = np.load(samples)["arr_0"]
    assert images.shape[1:] == (256, 256, 3) and images.dtype == np.uint8, images.shape
    t0 = time.perf_counter()
    fid = fid_against_adm(samples, reference)["fid"]
    took["fid"] = time.perf_counter() - t0
    assert np.isfinite(fid), fid
    tok = train.load_tokenizer(tok_dir)
    seq = tok.schedule.seq_len
    params = sum(p.numel() for p in tok.parameters()) / 1e6
    print(f"{preset}: tokenizer {params:.0f}M, {seq} tokens per image, {len(images)} samples "
          f"256², FID {fid:.1f} (2 training steps: only that it runs); seconds "
          + ", ".join(f"{k} {v:.0f}" for k, v in took.items()), flush=True)  # fmt: skip


def check_meta(preset: str) -> None:
    cfg = load_preset(preset)
    with torch.device("meta"):
        tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    model = build_model(cfg, tok.schedule, 1000, device="meta")
    plan = launch.plan_ar(cfg.updated(num_processes=16, gpu_mem_gib=80), tempfile.mkdtemp(),
                          launch.Cluster(16), write=False)  # fmt: skip
    assert plan.fit is not None, plan.summary()
    probe = tokenizer_activation_probe(cfg)
    tokenizer_plan = launch.plan_tokenizer(cfg.updated(gpu_mem_gib=80), 16, say=False)
    print(f"{preset}: {model.num_params() / 1e6:.0f}M transformer, {tok.schedule.seq_len} tokens,"
          f" layout {plan.fit.describe()}; tokenizer micro-batch "
          f"{tokenizer_plan.tokenizer.micro_batch} ({probe['bytes_per_pixel'] / 1e3:.0f} KB/px)",
          flush=True)  # fmt: skip


def paper_items(work: Path, reference: Path) -> None:
    """Fig. 3, Table 1's row, Fig. 5 and Fig. 10 of the cart-d16-256 run (VAR: the var-d16-256
    run) by papermill, opened with the settings the runs were trained with (their config.yaml;
    a run of the preset itself takes ``-p preset cart-d16-256``)."""
    import papermill as pm

    cart, var = work / "cart-d16-256", work / "var-d16-256"
    common = {"run_dir": str(cart), "preset": str(cart / "config.yaml"), "check_claims": False,
              "progress": False}  # fmt: skip
    notebooks = {
        "05_sampling": {**common, "n_per_class": 1, "grid_classes": 1, "sweep": False,
                        "adm_reference": str(reference), "fid_per_class": 1, "seed": 0},
        "07_attention_maps": {**common, "n_compare": 2, "var_run_dir": str(var),
                              "var_preset": str(var / "config.yaml")},
    }  # fmt: skip
    for name, params in notebooks.items():
        t0 = time.perf_counter()
        pm.execute_notebook(ROOT / "notebooks" / f"{name}.ipynb", work / f"{name}.ipynb",
                            parameters=params, kernel_name=KERNEL, cwd=str(ROOT / "notebooks"),
                            progress_bar=False)  # fmt: skip
        print(f"papermill {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    paper = cart / "paper"
    for item in ("fig3", "fig5", "fig10"):
        with Image.open(paper / f"{item}_cart-d16-256.png") as im:
            assert min(im.size) >= 256, (item, im.size)  # a 256² sample at least, at 300 dpi
    row = (paper / "table1_cart-d16-256.md").read_text()
    assert "cart-d16-256" in row and "FID" in row, row
    print("paper items at 256²:", ", ".join(sorted(p.name for p in paper.iterdir())), flush=True)


def reference_batch(root: Path, out: Path) -> Path:
    """An ADM-style reference batch (``arr_0``: uint8 N x 256 x 256 x 3) of the val images."""
    files = sorted((root / "val").rglob("*.*"))
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256))) for f in files])
    np.savez(out, arr_0=arr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", nargs="*", help="presets to check (default: all)")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)
    os.environ[launch.FULL_SCALE_ON_CPU] = "1"
    wanted = set(args.only or (*RUN, *META))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp).resolve()
        root = work / "imagenet"
        if not root.is_dir():  # written once: new files would be new data to a kept run
            make_image_folder(root, images=8, val_images=8, sizes=(240, 320))
        reference = reference_batch(root, work / "reference.npz")
        for preset in RUN:
            if preset in wanted:
                run_stages(preset, work, root, reference)
        if set(RUN) <= wanted:
            paper_items(work, reference)
        for preset in META:
            if preset in wanted:
                check_meta(preset)
    print("full-shape check: every stage ran at the presets' shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
