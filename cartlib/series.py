"""Execute the notebook series with papermill: ``make run`` / ``python -m cartlib run-series``.

``papermill_runs/<preset>/params.yaml`` holds a run's parameters::

    common:                     # passed to every notebook that declares the name
      preset: tiny
      run_dir: papermill_runs/tiny
    02_train_tokenizer:         # one notebook's own parameters (checked strictly)
      compare_base_loss: true
    notebooks: [06_ablation_decomposition_order]   # optional: run only these

Executed notebooks are written next to it (``papermill_runs/<preset>/<notebook>.ipynb``); those of
``defaults`` (``make publish``: every notebook at its committed defaults) and ``tiny`` (``make
run``) are committed for reading without running, the rest ignored by git. Every notebook adds
its numbers to ``<run_dir>/results.json`` and its figures to
``<run_dir>/figures/``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml

from cartlib.config import ConfigError
from cartlib.io import project_root, resolve_run_dir
from cartlib.params import NOTEBOOKS

KERNEL = "cartlib"


def series_notebooks(root: Path) -> list[Path]:
    return sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def notebook_parameters(spec: dict, name: str, declared: set[str]) -> dict:
    """The parameters of notebook ``name``: the ``common`` ones it declares, then its own."""
    params = {k: v for k, v in spec.get("common", {}).items() if k in declared}
    own = spec.get(name, {}) or {}
    unknown = set(own) - declared
    if unknown:
        raise ConfigError(
            f"params.yaml gives {name} unknown parameters {sorted(unknown)}; "
            f"it declares {sorted(declared)}"
        )
    return {**params, **own}


def shrink_outputs(path: Path, max_kib: int = 120, quality: int = 85) -> tuple[int, int]:
    """Keep an executed notebook small enough to commit and to open on a repository page: a
    PNG figure over ``max_kib`` is stored as a JPEG when that is smaller (photographs and sample
    grids shrink 3-10x; nbformat and every renderer take ``image/jpeg``), and the live panels'
    widget state (their last image, again) is dropped — the panels work in a running kernel,
    the static figures beside them are what a reader without one sees. -> (bytes before, after)"""
    import base64
    import io
    import json

    from PIL import Image

    before = path.stat().st_size
    nb = json.loads(path.read_text())
    nb["metadata"].pop("widgets", None)
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            png = data.get("image/png")
            if not png or len(png) * 3 // 4 <= max_kib * 1024:
                continue
            image = Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality, optimize=True)
            if buf.tell() < len(png) * 3 // 4:
                del data["image/png"]
                data["image/jpeg"] = base64.b64encode(buf.getvalue()).decode()
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return before, path.stat().st_size


def run_series(preset: str = "tiny", only: list[str] | None = None) -> int:
    import papermill as pm

    root = project_root()
    out_dir = root / "papermill_runs" / preset
    spec_path = out_dir / "params.yaml"
    if not spec_path.exists():
        raise FileNotFoundError(
            f"{spec_path} is missing: named runs are "
            f"{sorted(p.parent.name for p in (root / 'papermill_runs').glob('*/params.yaml'))}"
        )
    spec = yaml.safe_load(spec_path.read_text()) or {}
    unknown = set(spec) - {"common", "notebooks"} - set(NOTEBOOKS)
    if unknown:
        raise ConfigError(f"{spec_path}: no notebooks named {sorted(unknown)}")
    only = only or spec.get("notebooks")
    timings = {}
    for nb in series_notebooks(root):
        name = nb.stem
        if only and not any(name.startswith(o) for o in only):
            continue
        # the schema, not papermill's inspection: that drops lines whose comments hold "|"
        declared = {f.name for f in dataclasses.fields(NOTEBOOKS[name][0])}
        params = notebook_parameters(spec, name, declared)
        out = out_dir / nb.name
        print(f"== {name}  {params}", flush=True)
        t0 = time.time()
        pm.execute_notebook(
            str(nb),
            str(out),
            parameters=params,
            kernel_name=KERNEL,
            cwd=str(root / "notebooks"),
            progress_bar=False,
        )
        timings[name] = time.time() - t0
        shrink_outputs(out)
        print(f"   done in {timings[name]:.0f} s -> {out}", flush=True)
    print("\nExecuted notebooks:", out_dir)
    common_dir = (spec.get("common") or {}).get("run_dir")
    if common_dir is None:  # e.g. `make publish`: every notebook at its own default run_dir
        print("Figures, numbers:   in each notebook's own run_dir (its parameters cell)")
    else:
        run_dir = resolve_run_dir(common_dir)
        print("Figures:           ", run_dir / "figures")
        print("Numbers:           ", run_dir / "results.json")
    print(
        "Wall time:          " + ", ".join(f"{k[:2]} {v:.0f}s" for k, v in timings.items()),
        f"(total {sum(timings.values()) / 60:.1f} min)",
    )
    return 0
