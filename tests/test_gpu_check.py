"""benchmarks/gpu_check.py --dry: the GPU table's predictions, and every row's code run once at a
tiny size on the CPU, so the table is known to work before a GPU sees it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = (
    "decomposition",
    "tokenizer training",
    "cart-d16 sdpa",
    "cart-d16 per_step",
    "cart-d16 flex",
    "cart-d16 auto, compiled",
    "var-d16 sdpa",
    "var-d16 per_step",
    "var-d16 flex",
    "var-d16 auto, compiled",
    "cart-d16 per_step, checkpointing",
    "cart-d16 per_step, FSDP2 x2 no-sync",
    "d30-width block",
    "var-d30 1 GPU x1",
    "var-d30 1 GPU x2",
    "sampling (KV cache",
    "sampling seeded",
    "VAR's sampler",
)


def test_gpu_check_dry_run_writes_the_predicted_table(tmp_path):
    out = tmp_path / "gpu-table.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry", "--quick"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    assert "python benchmarks/gpu_check.py --out docs/gpu-table.md" in table  # what fills it in
    header = table.splitlines()[[ln.startswith("| row") for ln in table.splitlines()].index(True)]
    for column in ("layout", "GFLOP/token", "predicted GiB", "budget s", "confirms", "tiny run"):
        assert column in header, column
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and ln != header]
    names = [ln.split(" | ")[0][2:] for ln in lines]
    assert [max((r for r in ROWS if n.startswith(r)), key=len) for n in names] == list(ROWS)
    report = json.loads(out.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert report["mode"] == "dry" and sum(r["budget_s"] for r in rows.values()) <= 8 * 60
    for name, r in rows.items():
        assert r["status"].startswith(("ok", "skipped")), (name, r["status"])
        if name.startswith(("cart-", "var-", "d30")):  # training rows: the prediction, in full
            assert r["gflop_per_token"] > 0 and r["predicted_gib"] > 0 and r["layout"], name
            assert r["status"].startswith("ok: ")  # the tiny run names the kernel it saw
    assert rows["VAR's sampler (d16, CFG 1.5)"]["status"].startswith("skipped: VAR's source")
    # the single-GPU var-d30 rows: micro-batch 16 fits one H100; two accumulated = one GPU of the
    # 16 x 80 GB layout (the DDP bucket is one process's accumulated gradients)
    one, two = rows["var-d30 1 GPU x1"], rows["var-d30 1 GPU x2"]
    assert 55 < one["predicted_gib"] < two["predicted_gib"] < 72
    assert rows["cart-d16 per_step"]["predicted_gib"] > rows["cart-d16 sdpa"]["predicted_gib"]
