"""The dress rehearsal of a full-scale launch (issue 35): ``python -m cartlib rehearse --quick``
runs the cluster plan's launch in local processes — the real schedule and step count, a killed
rank, a machine without its data, the resume to the last step, the export, sampling and
notebook 04's closing cells — and passes; its pieces are right on their own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cartlib import rehearse
from cartlib.cluster import Cluster
from cartlib.config import load_preset
from cartlib.launch import plan_ar
from cartlib.train.checkpoints import read_history, read_manifest, save_checkpoint
from cartlib.train.loop import MAX_HISTORY

ROWS = ["plan", "data", "shrunk", "train-tokenizer", "extract-tokens", "train-ar: first step",
        "fast-forward", "a machine without its data", "a rank killed mid-step",
        "resume to the last step", "export", "sample", "notebook 04"]  # fmt: skip


@pytest.mark.slow
def test_the_quick_rehearsal_of_cart_d30_on_two_machines_passes(tmp_path):
    """``python -m cartlib rehearse --preset cart-d30-256 --num_machines 2 --gpus_per_machine 8
    --gpu_memory 80 --quick``: every step passes, in the order the module promises."""
    cmd = [sys.executable, "-m", "cartlib", "rehearse", "--preset", "cart-d30-256",
           "--num_machines", "2", "--gpus_per_machine", "8", "--gpu_memory", "80", "--quick",
           "--run-dir", str(tmp_path)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads((tmp_path / "rehearsal" / rehearse.REPORT).read_text())
    assert [r["name"] for r in report["rows"]] == ROWS and report["ok"]
    rows = {r["name"]: r for r in report["rows"]}
    assert "FSDP" in rows["plan"]["detail"] and "L = 2066" in rows["plan"]["detail"]
    assert "584,150 steps" in rows["shrunk"]["detail"]  # the real step count
    assert "up to step 584,149" in rows["resume to the last step"]["detail"]
    assert "| a rank killed mid-step | pass |" in out.stdout  # the table
    peaks = [r["peak_gb"] for r in report["rows"]]  # the largest process so far, per step
    assert all(0 < p < 64 for p in peaks) and peaks == sorted(peaks), peaks
    assert "--machine_rank 1" in report["submit"][1] and report["submit"][2].startswith("sbatch")
    folder = next((tmp_path / "rehearsal").glob("ar-*"))
    history = read_history(folder)
    assert len(history) <= MAX_HISTORY + 1 and history[-1]["step"] == 584_149
    results = json.loads((tmp_path / "rehearsal" / "results.json").read_text())["04_train_ar"]
    assert results["steps"] == 584_150  # notebook 04 counted the steps, not the history's length


def test_the_rehearsal_keeps_the_plans_layout_at_a_cpus_width(tmp_path):
    cfg = load_preset("cart-d30-256", num_processes=16, gpu_mem_gib=80)
    plan = plan_ar(cfg, tmp_path, Cluster(16, 2, 0, "10.0.0.1"), write=False)
    small = rehearse.shrunk(plan.config, plan.fit, "full", tmp_path, 16)
    a = small.ar
    assert (a.fsdp, a.grad_ckpt) == (plan.fit.fsdp, plan.fit.checkpointing)
    assert a.depth == 30 and a.model_width == rehearse.WIDTH
    assert small.schedule().seq_len == 2066 and a.steps == cfg.ar.steps
    assert small.tokenizer.codebook_size == 4096 and small.num_processes == 4
    # the ranks keep a layout the config states (the launch config) instead of re-planning it
    ranks = plan_ar(small, tmp_path, Cluster(4, 2, 0, "127.0.0.1"), write=False)
    assert (ranks.config.ar.micro_batch, ranks.config.ar.fsdp) == (1, a.fsdp)
    assert rehearse.shrunk(plan.config, plan.fit, "quick", tmp_path, 4).ar.depth == 2


def test_fast_forward_moves_the_step_and_leaves_a_long_runs_history(tmp_path):
    state = {"step": 1, "history": [{"step": 0, "loss": 8.3}],
             "schedulers": {"sched": {"last_epoch": 1, "_step_count": 2}}}  # fmt: skip
    save_checkpoint(tmp_path, state)
    n = rehearse.fast_forward(tmp_path, 584_148, 584_150)
    entry = read_manifest(tmp_path)[0]
    assert entry["step"] == 584_148 and len(read_manifest(tmp_path)) == 1
    history = read_history(tmp_path)
    every = -(-584_150 // MAX_HISTORY)
    assert n == len(history) == len(range(every - 1, 584_148, every))
    assert history[-1]["step"] < 584_148 and all(h["loss"] == 8.3 for h in history)
    assert not (tmp_path / "step-00000001.pt").exists()


def test_a_report_is_reused_only_for_the_launch_it_rehearsed(tmp_path):
    cfg = load_preset("cart-d30-256", num_processes=16)
    cluster = Cluster(16, 2, 0, "10.0.0.1")
    key = rehearse.key(cfg, cluster, "quick")
    rows = [rehearse.Row("plan", True, 1.0, "")]
    report = rehearse.Report(cfg.name, "quick", key, tmp_path / "rehearsal", rows)
    report.run_dir.mkdir()
    report.save()
    assert rehearse.previous(cfg, cluster, tmp_path, "quick") is not None
    assert rehearse.previous(cfg, cluster, tmp_path, "full") is None
    assert rehearse.previous(cfg.updated(ar={"lr": 2e-4}), cluster, tmp_path, "quick") is None
    assert rehearse.previous(cfg, Cluster(8), tmp_path, "quick") is None
    report.rows.append(rehearse.Row("sample", False, 1.0, "broken"))
    report.save()
    assert rehearse.previous(cfg, cluster, tmp_path, "quick") is None  # a failed one is not


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="rehearse='fast'"):
        rehearse.rehearse(load_preset("smoke"), Cluster(1), Path("/tmp"), "fast")
