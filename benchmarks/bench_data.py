"""The data path's throughput on this machine, and the smoke run before/after a change.

    python benchmarks/bench_data.py [--images 32] [--resolution 256] [--device cuda]
    python benchmarks/bench_data.py --against /path/to/other/checkout [--steps 40]

The first writes a synthetic image folder (JPEG/PNG, 1.0-1.6x the resolution) and measures, at
the full-scale settings (VAR augmentation, order 3): decode + augment images/s (main process and
2 DataLoader workers), decompositions/s (batch 16, on the device), the decomposition's share of a
tokenizer training step (batch 2) and extraction images/s (decompose + encode on the device;
the paper's tokenizer shape, but 32 channels wide instead of 160 on a CPU unless
``--channels``), then the disk and time of extracting ImageNet's 1,281,167 training images with
2 views at those rates. ``--against`` runs the smoke tokenizer and transformer (data loading,
training, token extraction) with this checkout and another one alternately, each in its own
process, and prints the wall times and their ratio. Never fails on time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cartlib.config import load_preset
from cartlib.data.stream import Bases, StepSampler, StepStream, source_for
from cartlib.data.synthetic import make_image_folder
from cartlib.tokenizer import Tokenizer

IMAGENET_TRAIN = 1_281_167

SMOKE = """
import json, sys, tempfile, time
from cartlib import runs, train
from cartlib.config import load_preset
steps = int(sys.argv[1])
cfg = load_preset("smoke", tokenizer={"steps": steps}, ar={"steps": steps})
with tempfile.TemporaryDirectory() as run_dir:
    t0 = time.perf_counter()
    tok = runs.ensure_tokenizer(cfg, run_dir, progress=False)
    t1 = time.perf_counter()
    tokens, labels, nc = runs.ensure_tokens(cfg, run_dir, tok, "train", progress=False)
    t2 = time.perf_counter()
    train.train_ar(cfg, run_dir, tok, tokens, labels, nc, progress=False)
    t3 = time.perf_counter()
print(json.dumps({"tokenizer_s": t1 - t0, "tokens_s": t2 - t1, "ar_s": t3 - t2}))
"""


def smoke(against: str, steps: int, repeats: int) -> None:
    """Alternate this checkout and ``against`` (the decomposition cache is warmed first)."""
    here = str(Path(__file__).resolve().parents[1])
    times: dict[str, list[dict]] = {here: [], against: []}
    for i in range(repeats + 1):
        for src in (here, against):
            env = {**os.environ, "PYTHONPATH": src}
            out = subprocess.run([sys.executable, "-c", SMOKE, str(steps)], env=env, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
            if i:  # the first round warms the caches (decomposition, page cache)
                times[src].append(json.loads(out.strip().splitlines()[-1]))
    print(f"smoke preset, {steps} tokenizer + {steps} transformer steps, median of {repeats}:")
    print("| checkout | tokenizer s | token extraction s | transformer s |")
    print("|---|---|---|---|")
    keys = ("tokenizer_s", "tokens_s", "ar_s")
    med = {src: {k: statistics.median(t[k] for t in ts) for k in keys} for src, ts in times.items()}
    for src, m in med.items():
        print(f"| {src} | {m['tokenizer_s']:.1f} | {m['tokens_s']:.1f} | {m['ar_s']:.1f} |")
    ratio = {k: med[here][k] / med[against][k] for k in med[here]}
    print("ratio this / other:", {k: round(v, 2) for k, v in ratio.items()})


def _rate(fn, n_items: int, repeats: int = 3) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * n_items / (time.perf_counter() - t0)


def rates(images: int, resolution: int, device: str, channels: int) -> None:
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_image_folder(tmp, images, classes=8, sizes=(resolution, resolution * 8 // 5))
        cfg = load_preset("cart-d16-256", data={"root": str(root), "resolution": resolution,
                                                "test_limit": None},
                          tokenizer={"channels": channels})  # fmt: skip
        source = source_for(cfg.data, "train", progress=False)
        bs = 16
        out = {"device": device, "resolution": resolution, "threads": torch.get_num_threads(),
               "tokenizer_channels": channels}  # fmt: skip
        for workers in (0, 2):
            sampler = StepSampler(len(source), bs, 0, random_crop=True, hflip=True)
            per_epoch = len(source) // bs
            stream = StepStream(source, sampler, "cpu", 10**6, workers)
            steps = iter(range(10**6))

            def epoch(stream=stream, steps=steps, n=per_epoch):
                return [stream(next(steps)) for _ in range(n)]

            out[f"decode_img_s_workers{workers}"] = _rate(epoch, bs * per_epoch)
            stream.close()
        x = StepStream(source, StepSampler(len(source), bs, 0), dev, 1)(0)[0]
        bases = Bases(cfg, source, dev, progress=False)
        out["decompose_img_s"] = _rate(lambda: bases(x, None), bs)
        tok = Tokenizer(cfg.tokenizer, cfg.decompose, resolution).to(dev)
        b = bases(x, None)
        xs, bs_small = x[:2], b[:2]

        def train_step():
            out_ = tok(xs, bs_small)
            ((out_.recon - xs) ** 2).mean().backward()

        t_step = 1 / _rate(train_step, 1, repeats=1)
        t_dec = 1 / _rate(lambda: bases(xs, None), 1, repeats=1)
        out["decompose_share_of_tokenizer_step"] = t_dec / (t_dec + t_step)
        with torch.no_grad():
            out["extract_img_s"] = _rate(lambda: tok.encode(xs, bases(xs, None)), 2, repeats=1)
        seq = cfg.schedule().seq_len
        views = 2
        out["imagenet_extract_disk_gb"] = IMAGENET_TRAIN * views * seq * 2 / 1e9
        out["imagenet_extract_hours_one_process"] = (
            IMAGENET_TRAIN * views / out["extract_img_s"] / 3600
        )
    for k, v in out.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="another checkout: compare the smoke run instead")
    ap.add_argument("--steps", type=int, default=40, help="smoke: steps of each training")
    ap.add_argument("--repeats", type=int, default=2, help="smoke: timed rounds")
    ap.add_argument("--images", type=int, default=32, help="rates: synthetic images")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--channels", type=int, help="tokenizer width (paper 160; CPU default 32)")
    a = ap.parse_args()
    if a.against:
        smoke(a.against, a.steps, a.repeats)
    else:
        rates(a.images, a.resolution, a.device, a.channels or (160 if a.device != "cpu" else 32))


if __name__ == "__main__":
    main()
