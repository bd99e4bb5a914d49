"""Every full-scale preset trains for the epochs, warm-up, lr and batch that docs/full-scale.md's
recipe table states (VAR's scripts for var-*, the paper's lr and batch with VAR's
epochs for cart-*): a changed preset or a changed table fails here."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from cartlib.config import load_preset
from cartlib.fit import IMAGENET_TRAIN

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "full-scale.md"
ROW = re.compile(
    r"^\| ((?:cart|var)-d[\w-]+) \| (\d+) \| (\d+) \| ([\d.e-]+) \| (\d+) \| [^|]+ \|$", re.M
)


def recipes() -> dict[str, tuple[int, int, float, int]]:
    return {m[1]: (int(m[2]), int(m[3]), float(m[4]), int(m[5])) for m in ROW.finditer(
        RECIPES.read_text())}  # fmt: skip


def full_scale_presets() -> list[str]:
    folder = Path(load_preset.__code__.co_filename).parent / "presets"
    return sorted(p.stem for p in folder.glob("*.yaml") if re.match(r"(cart|var)-d", p.stem))


def test_the_table_lists_every_full_scale_preset():
    assert sorted(recipes()) == full_scale_presets()


@pytest.mark.parametrize("preset", full_scale_presets())
def test_preset_trains_as_the_readme_says(preset):
    epochs, warmup_epochs, lr, batch = recipes()[preset]
    a = load_preset(preset).ar
    per_epoch = math.ceil(IMAGENET_TRAIN / a.batch_size)
    assert a.batch_size == batch
    assert a.lr == pytest.approx(lr)
    assert a.steps == epochs * per_epoch, f"{preset}: {a.steps / per_epoch:.2f} epochs"
    assert a.warmup == round(warmup_epochs * per_epoch)
    assert warmup_epochs == epochs // 50  # VAR's warm-up: a 50th of the run


def test_var_baselines_follow_vars_scripts():
    """VAR's README: tblr 8e-5 from d24 on, batch 1024 for d30, VAR's 10 scales (512: its own)."""
    assert load_preset("var-d16-256").ar.lr == 1e-4 and load_preset("var-d24-256").ar.lr == 8e-5
    assert load_preset("var-d30-256").ar.batch_size == 1024
    assert load_preset("var-d16-256").tokenizer.base_patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert load_preset("var-d30-512").tokenizer.base_patch_nums == (
        1, 2, 3, 4, 6, 9, 13, 18, 24, 32,
    )  # fmt: skip
