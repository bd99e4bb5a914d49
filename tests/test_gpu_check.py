"""benchmarks/gpu_check.py runs on a CPU with --dry, so it is known to work before a GPU sees it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_every_row_and_succeeds():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout
    for row in (
        "decomposition",
        "tokenizer training",
        "cart-d16 training plain",
        "cart-d16 training ckpt",
        "cart-d16 training fsdp",
        "var-d16 training fsdp",
        "sampling (KV cache",
        "sampling seeded | reproducible True",
    ):
        assert row in table, row
    assert "FAILED" not in table
