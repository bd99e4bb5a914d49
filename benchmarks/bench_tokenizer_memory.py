"""The tokenizer stage's memory plan for every full-scale preset: activations per pixel (measured
with saved-tensor hooks at the run's architecture, bf16 autocast and fp32) and the micro-batch x
accumulation chosen on 16 x A100-80GB and 8 x H200-141GB. Prints a table; never fails on time.

    python benchmarks/bench_tokenizer_memory.py
"""

from __future__ import annotations

import time

from cartlib.config import load_preset
from cartlib.fit import GIB, choose_tokenizer_fit, tokenizer_activation_probe

PRESETS = ("cart-d16-256", "var-d16-256", "cart-d30-512", "var-d30-512")
CLUSTERS = ((16, 80.0), (8, 141.0))


def main() -> None:
    print("preset        | KB/px bf16 | KB/px fp32 | GiB/image bf16 | "
          + " | ".join(f"{n} x {m:.0f} GB" for n, m in CLUSTERS) + " | probe s")  # fmt: skip
    for name in PRESETS:
        cfg = load_preset(name)
        t0 = time.perf_counter()
        bf16 = tokenizer_activation_probe(cfg, "bf16")
        fp32 = tokenizer_activation_probe(cfg, "no")
        took = time.perf_counter() - t0
        res, batch = cfg.data.resolution, cfg.tokenizer.batch_size
        fits = []
        for n, mem in CLUSTERS:
            f = choose_tokenizer_fit(bf16, res, batch, n, mem)
            fits.append(f"{f.micro_batch} x {f.accumulation}, ~{f.peak_gib:.0f} GiB")
        per_image = bf16["bytes_per_pixel"] * res**2 / GIB
        print(f"{name:13} | {bf16['bytes_per_pixel'] / 1e3:10.1f} | "
              f"{fp32['bytes_per_pixel'] / 1e3:10.1f} | {per_image:14.2f} | "
              + " | ".join(fits) + f" | {took:.1f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
