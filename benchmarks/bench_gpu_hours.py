"""Estimated GPU-hours of every stage of each full-scale preset (cartlib.fit.gpu_hours): FLOPs
counted by torch's FlopCounterMode, at an A100's dense bf16 rate and the assumed utilisations of
cartlib.fit.ASSUMED_MFU (estimates until benchmarks/gpu_check.py measures a GPU). The named runs'
params.yaml (papermill_runs/<preset>/) quote these numbers.

    python benchmarks/bench_gpu_hours.py
"""

from __future__ import annotations

from cartlib.config import load_preset
from cartlib.fit import A100_BF16_TFLOPS, ASSUMED_MFU, gpu_hours

PRESETS = ("cart-d16-256", "var-d16-256", "cart-d20-256", "cart-d24-256", "cart-d30-256",
           "var-d30-256", "cart-d30-512")  # fmt: skip


def main() -> None:
    print(f"A100 bf16 {A100_BF16_TFLOPS:.0f} TFLOP/s, assumed utilisation {ASSUMED_MFU}")
    print("preset        | tokenizer | extraction | transformer | 50k samples | total GPU-h")
    for name in PRESETS:
        h = gpu_hours(load_preset(name))
        print(f"{name:13} | {h['tokenizer']:9,.0f} | {h['extract']:10,.0f} | {h['ar']:11,.0f} | "
              f"{h['sample']:11,.1f} | {h['total']:11,.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
