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

import base64
import dataclasses
import html
import io
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

from cartlib import hardware
from cartlib.config import ConfigError
from cartlib.io import project_root, resolve_run_dir
from cartlib.params import NOTEBOOKS
from cartlib.viz.core import PANEL_NOTE

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


def shrink_outputs(
    path: Path, max_kib: int = 120, quality: int = 90, max_png_kib: int = 512
) -> tuple[int, int]:
    """Keep an executed notebook small enough to commit and to open on a repository page: a
    PNG over ``max_kib`` that shows photographs only (marked ``photo`` by
    :func:`cartlib.viz.core.figure_png`: sample and photo grids) is stored as a JPEG when that is
    smaller. Every other figure — detail strips, decompositions, attention maps, plots — stays
    PNG, since their point is faint detail, unless it is over ``max_png_kib`` (a decomposition
    of photographs with its amplified detail layers, which PNG barely compresses): that one is
    stored as a JPEG at quality 95 without chroma subsampling — per-pixel errors of 1-2 levels
    of 255 (rms), which the eye does not see — when that is under half the bytes. The widget
    state (the live panels' last images and the progress bars', again) is dropped.
    -> (bytes before, after)"""
    before = path.stat().st_size
    nb = json.loads(path.read_text())
    nb["metadata"].pop("widgets", None)
    for out in _outputs(nb):
        data, meta = out.get("data", {}), out.get("metadata", {})
        png = data.get("image/png")
        if not png:
            continue
        raw = base64.b64decode(png)
        photo = meta.get("image/png", {}).get("photo")
        if len(raw) <= (max_kib if photo else max_png_kib) * 1024:
            continue
        buf = io.BytesIO()
        options = {"quality": quality} if photo else {"quality": 95, "subsampling": 0}
        Image.open(io.BytesIO(raw)).convert("RGB").save(buf, "JPEG", optimize=True, **options)
        if buf.tell() < (len(raw) if photo else len(raw) // 2):
            del data["image/png"]
            data["image/jpeg"] = base64.b64encode(buf.getvalue()).decode()
            size = {k: v for k, v in meta.pop("image/png").items() if k in ("width", "height")}
            meta["image/jpeg"] = size
    _write(path, nb)
    return before, path.stat().st_size


def language_info() -> dict:
    """The ``language_info`` the cartlib kernel reports (ipykernel, this Python): what JupyterLab
    writes into a notebook's metadata when the kernel starts."""
    return {
        "codemirror_mode": {"name": "ipython", "version": 3},
        "file_extension": ".py",
        "mimetype": "text/x-python",
        "name": "python",
        "nbconvert_exporter": "python",
        "pygments_lexer": "ipython3",
        "version": platform.python_version(),
    }


def normalise_metadata(path: Path) -> bool:
    """Commit a notebook's metadata as JupyterLab leaves it (issue 36, finding 10): the kernel
    ``cartlib`` and its full ``language_info``; with the latter stripped, JupyterLab fills it in
    on open and the notebook is marked modified before the reader changed anything. Only the
    metadata changes (the file is otherwise written back as it was, nbformat's layout).
    -> whether the file changed."""
    text = path.read_text()
    nb = json.loads(text)
    nb["metadata"]["kernelspec"] = {
        "display_name": "Python (cartlib)",
        "language": "python",
        "name": KERNEL,
    }
    nb["metadata"]["language_info"] = language_info()
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new)
    return new != text


# ----------------------------------------------------------------------------- published copies
# tqdm's text: "{desc}: {pct}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}]"
_BAR = re.compile(
    r"(?P<desc>[^\r\n]*?):?\s*\d+%\|[^|\n]*\|\s*(?P<n>[\d.]+[kMGT]?)/(?P<total>[\d.]+[kMGT]?)"
    r"\s*\[(?P<elapsed>[\d:]+)(?:<[^,\]]*)?(?:,\s*(?P<rate>[^\]]*))?\]"
)
_WIDGET = "application/vnd.jupyter.widget-view+json"
_TEXTS = ("text/plain", "text/markdown", "text/html")


def publish_outputs(path: Path, root: Path | None = None) -> dict[str, int]:
    """Clean an executed notebook for readers without a kernel (``make publish``, ``make run``):

    - every progress bar (a tqdm widget, or tqdm's text in a stream) becomes its final summary
      line, ``train: 150/150 in 58 s (2.57 it/s)``, read from the widget state papermill saved;
    - every live panel becomes its first image as a PNG under the note
      :data:`~cartlib.viz.core.PANEL_NOTE` (no widget repr, no widget that cannot load);
    - machine paths go: the project root becomes relative, the home folder ``~``, the temp
      folder ``<tmp>``;

    then :func:`shrink_outputs`. -> counts of what was replaced."""
    root = Path(root or project_root())
    nb = json.loads(path.read_text())
    state = nb["metadata"].get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = state.get("state", {})
    counts = {"progress bars": 0, "panels": 0, "paths": 0}
    for cell in nb["cells"]:
        outputs = []
        for out in cell.get("outputs", []):
            outputs += _published(out, models, counts)
        if "outputs" in cell:
            cell["outputs"] = outputs
    for out in _outputs(nb):
        counts["paths"] += _strip_paths(out, root)
    meta = nb["metadata"].get("papermill", {})
    for key in ("input_path", "output_path"):
        if isinstance(meta.get(key), str):
            meta[key] = _relative(meta[key], root)[0]
    _write(path, nb)
    shrink_outputs(path)
    return counts


def _published(out: dict, models: dict, counts: dict) -> list[dict]:
    """What a reader without a kernel sees in place of one output (a list: zero or more)."""
    data = out.get("data", {})
    if out.get("output_type") == "stream":
        text = "".join(out["text"])
        if "%|" in text:
            text, n = _summarise_stream(text)
            counts["progress bars"] += n
            out = {**out, "text": text}
        return [out] if out["text"] else []
    if _WIDGET not in data:
        return [out]
    model = data[_WIDGET].get("model_id", "")
    text = "".join(data.get("text/plain", ""))
    if "%|" in text or _is_progress(models, model):
        counts["progress bars"] += 1
        line = _progress_line(models, model, text)
        return [{"output_type": "stream", "name": "stdout", "text": line + "\n"}]
    counts["panels"] += 1
    note = {"output_type": "display_data", "metadata": {},
            "data": {"text/markdown": f"*{PANEL_NOTE}*", "text/plain": PANEL_NOTE}}  # fmt: skip
    png = data.get("image/png") or _panel_image(models, model)
    if not png:
        return [note]
    meta = {k: v for k, v in out.get("metadata", {}).items() if k == "image/png"}
    image = {"output_type": "display_data", "metadata": meta,
             "data": {"image/png": png, "text/plain": PANEL_NOTE}}  # fmt: skip
    return [note, image]


def _children(models: dict, model: str) -> list[str]:
    """The model ids of a saved box widget's children."""
    children = models.get(model, {}).get("state", {}).get("children", [])
    return [c.removeprefix("IPY_MODEL_") for c in children]


def _is_progress(models: dict, model: str) -> bool:
    names = [models.get(c, {}).get("model_name") for c in _children(models, model)]
    return "FloatProgressModel" in names


def _progress_line(models: dict, model: str, text: str) -> str:
    """The final state of a tqdm widget as one line (its HTML labels in the saved state); where
    the state was not saved, what the first frame tells (description, total) and that."""
    parts = [models.get(c, {}).get("state", {}).get("value") for c in _children(models, model)]
    if len(parts) == 3 and isinstance(parts[0], str) and isinstance(parts[2], str):
        final = html.unescape(f"{parts[0]}|#|{parts[2]}").replace("\u2007", " ")
        if _BAR.search(final):
            return _BAR.sub(_summary, final).strip()
    found = _BAR.search(text.replace("\u2007", " "))
    if not found:
        return "a progress bar (its final state was not saved)"
    unit = (found["rate"] or "").removeprefix("?").removesuffix("/s") or "it"
    desc = found["desc"].strip() or "progress"
    return f"{desc}: {found['total']} {unit} (its final state was not saved)"


def _summary(found: re.Match) -> str:
    """``desc: 150/150 in 58 s (2.57 it/s)`` for one tqdm line."""
    seconds = sum(int(x) * 60**i for i, x in enumerate(reversed(found["elapsed"].split(":"))))
    rate = (found["rate"] or "").strip()
    rate = "" if rate.startswith("?") else re.sub(r"^([\d.]+)\s*(\S)", r" (\1 \2", rate)
    desc = found["desc"].strip() or "progress"
    return f"{desc}: {found['n']}/{found['total']} in {seconds} s{rate}{')' if rate else ''}"


def _summarise_stream(text: str) -> tuple[str, int]:
    """tqdm's text output in a stream (each update after a carriage return): every bar's last
    update only, as its summary line; other lines as they are. -> (text, bars summarised)"""
    lines, bars = [], 0
    for line in text.split("\n"):
        last = line.split("\r")[-1] if "%|" in line else line
        last, n = _BAR.subn(_summary, last)
        lines.append(last)
        bars += n
    return "\n".join(lines), bars


def _panel_image(models: dict, model: str) -> str | None:
    """The PNG (base64) of the Image widget inside a saved panel, if the state holds one."""
    for child in _children(models, model):
        if models.get(child, {}).get("model_name") == "ImageModel":
            found = [b for b in models[child].get("buffers", []) if b.get("path") == ["value"]]
        else:
            found = [{"data": _panel_image(models, child)}]
        if found and found[0]["data"]:
            return found[0]["data"]
    return None


def _relative(text: str, root: Path) -> tuple[str, int]:
    """``text`` without machine paths: the project root -> relative, home -> ``~``, the temp
    folder -> ``<tmp>``; -> (text, how many were replaced)."""
    count = 0
    rules = [(str(root) + "/", ""), (str(root), "."), (str(Path.home()), "~")]
    rules += [(t, "<tmp>") for t in dict.fromkeys([tempfile.gettempdir(), "/tmp"])]
    for prefix, new in rules:
        if prefix in ("/", ".", "~"):
            continue
        pattern = re.compile(
            re.escape(prefix) + (r"(?![\w.-])" if not prefix.endswith("/") else "")
        )
        text, n = pattern.subn(new, text)
        count += n
    return text, count


def _strip_paths(out: dict, root: Path) -> int:
    count = 0
    if "text" in out:
        out["text"], count = _relative("".join(out["text"]), root)
    for key in _TEXTS:
        if key in out.get("data", {}):
            out["data"][key], n = _relative("".join(out["data"][key]), root)
            count += n
    if "traceback" in out:
        pairs = [_relative(line, root) for line in out["traceback"]]
        out["traceback"] = [t for t, _ in pairs]
        count += sum(n for _, n in pairs)
    return count


def _outputs(nb: dict):
    for cell in nb["cells"]:
        yield from cell.get("outputs", [])


def _write(path: Path, nb: dict) -> None:
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


RUNTIMES = "runtimes.json"  # beside a run's executed copies: how long each took, on what CPU
RUNTIME_LINE = re.compile(r"Runtime at the defaults:[^*\n\"]*")


def cpu_kind() -> str:
    """This CPU as the runtime tables name it: ``avx512_bf16`` where bf16 is native, else the
    kernels torch uses (``AVX2``), with the precision the notebooks then train in."""
    native, _ = hardware.cpu_bf16()
    if native:
        return "avx512_bf16 (bf16)"
    return f"{hardware.cpu_facts()['capability']} only (fp32)"


def record_runtime(path: Path, seconds: float) -> dict:
    """After executing ``path``: its wall time into ``runtimes.json`` beside it (by notebook,
    with the CPU and the date), and into the copy's header line "Runtime at the defaults: ...",
    which points to the README's table for other machines. -> the runtimes."""
    table = path.parent / RUNTIMES
    runtimes = json.loads(table.read_text()) if table.exists() else {}
    kind, day = cpu_kind(), time.strftime("%Y-%m-%d")
    runtimes[path.stem] = {"seconds": round(seconds), "cpu": kind, "cores": os.cpu_count(),
                           "date": day}  # fmt: skip
    table.write_text(json.dumps(runtimes, indent=1, sort_keys=True) + "\n")
    nb = json.loads(path.read_text())
    line = (f"Runtime at the defaults: {seconds:.0f} s for this copy ({kind}, "
            f"{os.cpu_count()} cores, {day}); other machines: "
            "[README](../README.md#the-notebooks)")  # fmt: skip
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            text = "".join(cell["source"])
            if RUNTIME_LINE.search(text):
                cell["source"] = RUNTIME_LINE.sub(line, text, count=1)
                break
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return runtimes


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
        publish_outputs(out, root)
        record_runtime(out, timings[name])
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
