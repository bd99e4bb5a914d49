"""The committed notebooks: clean (no outputs), and their `parameters` cells match the schemas
that validate them. (Executing them is the nbval pass of `make test`.)"""

import ast
import base64
import dataclasses
import io
import json
import re
from pathlib import Path

import nbformat
import pytest

from cartlib.config import ConfigError
from cartlib.params import NOTEBOOKS, notebook_config, trains
from cartlib.series import language_info, normalise_metadata, publish_outputs, shrink_outputs

ROOT = Path(__file__).resolve().parents[1]
PATHS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def cells(path):
    return json.loads(path.read_text())["cells"]


def test_every_notebook_has_a_schema_and_every_schema_a_notebook():
    assert {p.stem for p in PATHS} == set(NOTEBOOKS)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            assert c.get("outputs") == [], f"{path.name}: a cell has outputs; clear them"
            assert c.get("execution_count") is None, f"{path.name}: execution counts left"
    assert nb["metadata"]["kernelspec"]["name"] == "cartlib"
    info = nb["metadata"].get("language_info", {})
    expected = {k: v for k, v in language_info().items() if k != "version"}
    assert {k: v for k, v in info.items() if k != "version"} == expected and re.fullmatch(
        r"3\.\d+\.\d+", info.get("version", "")
    ), (
        f"{path.name}: language_info is not what the kernel reports, so JupyterLab marks the "
        "notebook modified on open: run cartlib.series.normalise_metadata on it"
    )


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_parameters_cell_matches_its_schema(path):
    code = [c for c in cells(path) if c["cell_type"] == "code"]
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "one `parameters` cell, the first code cell"
    tree = ast.parse("".join(tagged[0]["source"]))
    values = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign), "parameters are plain assignments"
        values[node.targets[0].id] = ast.literal_eval(node.value)
    schema, _ = NOTEBOOKS[path.stem]
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(schema)
    }
    assert values == defaults
    assert f'notebook_config("{path.stem}", globals())' in "".join(code[1]["source"])


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_papermill_sees_every_parameter(path):
    """papermill skips parameter lines it cannot parse (e.g. '=' in a comment) and then warns
    "Passed unknown parameter" at users; every schema field must be visible to it."""
    import papermill as pm

    schema, _ = NOTEBOOKS[path.stem]
    assert set(pm.inspect_notebook(str(path))) == {f.name for f in dataclasses.fields(schema)}


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_a_notebook_that_ran_takes_its_parameters_from_the_parameters_cell(path):
    """After a whole run the kernel holds the notebook's own variables, some named like a
    parameter (01's ``run_dir`` made a Path, 07's loop variable ``label``): re-running the config
    cell, alone or after an edited parameters cell, takes what the parameters cell last set; a
    line removed from it is forgotten; a typo is refused by its own name, and forgotten once
    fixed. (The nbval pass does the same in a live kernel.)"""
    code = ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "code"]
    schema, _ = NOTEBOOKS[path.stem]
    assigned = [n for n in ast.parse(code[1]).body if isinstance(n, ast.Assign)]
    derived = {t.id for n in assigned for t in n.targets if isinstance(t, ast.Name)}  # 04: preset
    shadowed = {f.name: object() for f in dataclasses.fields(schema)}  # wrong type for each
    shadowed.update({f.name: f.default for f in dataclasses.fields(schema) if f.name in derived})
    ran = ["", *code]

    def rerun(*edits: str):
        return notebook_config(path.stem, {**shadowed, "In": [*ran, *edits, code[1]]})[0]

    assert rerun() == schema()
    assert rerun(code[0] + "\nprogress = False\n").progress is False
    without = "".join(line for line in code[0].splitlines(True) if not line.startswith("progress"))
    assert rerun(code[0] + "\nprogress = False\n", code[1], without).progress is True
    with pytest.raises(ConfigError, match=r"^unknown parameter .*'progres'.*progress"):
        rerun(code[0] + "\nprogres = False\n")
    assert rerun(code[0] + "\nprogres = False\n", code[1], code[0]) == schema()
    assert rerun(code[0] + "\nprogress = not True  # computed, not a literal\n").progress is False


def test_depth_30_on_the_small_default_preset_means_cart_d30_in_a_live_kernel():
    """`-p depth 30` on 04's default preset (tiny) is CART-d30 (cart-d30-256): the schema maps
    it, so the config cell derives nothing and a re-run from it maps the same way."""
    params_cell = 'preset = "tiny"\ndepth = None\nprogress = True\n'
    config_cell = 'params, cfg = notebook_config("04_train_ar", globals())\n'
    history = ["", params_cell, "# Parameters\ndepth = 30\n", config_cell]
    namespace = {"In": history, "preset": "stale", "depth": 30, "progress": "stale"}
    params, cfg = notebook_config("04_train_ar", namespace)
    assert (params.preset, params.depth, params.progress, cfg.name) == (
        "cart-d30-256",
        30,
        True,
        "cart-d30-256",
    )
    again = notebook_config("04_train_ar", {**namespace, "In": [*history, config_cell]})[1]
    assert again.name == "cart-d30-256"
    params_small = notebook_config(
        "04_train_ar", {"In": ["", 'preset = "tiny"\ndepth = 3\n', config_cell]}
    )[0]
    assert (params_small.preset, params_small.depth) == ("tiny", 3)  # not a paper depth


def test_papermill_injected_parameters_override_the_parameters_cell():
    """papermill runs the parameters cell, then the cell it injects ("# Parameters" first): both
    count, the injected values last; values that are not literals are read from the kernel."""
    from papermill.translators import PythonTranslator

    path = ROOT / "notebooks" / "05_sampling.ipynb"
    code = ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "code"]
    injected = PythonTranslator.codify({"seed": 1, "top_p": float("inf"), "n_per_class": 2})
    history = ["", code[0], injected, code[1]]
    params, _ = notebook_config(path.stem, {"In": history, "top_p": 0.5, "seed": "x"})
    assert (params.seed, params.top_p, params.n_per_class, params.guidance) == (1, 0.5, 2, 2.0)
    with pytest.raises(ConfigError, match="unknown parameter .*'sede'"):
        notebook_config(path.stem, {"In": ["", code[0], "# Parameters\nsede = 1\n"]})


LESSONS = [p for p in PATHS if p.stem[:2] in {"03", "04", "05", "06", "07"}]


def code_of(path) -> str:
    return "\n".join("".join(c["source"]) for c in cells(path) if c["cell_type"] == "code")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_figures_are_built_in_cartlib_viz_and_shown_one_way(path):
    """Notebooks import, call and show: no matplotlib of their own, every figure through
    ``viz.show(fig, name)`` (which also registers it for ``save_open_figures``)."""
    code = code_of(path)
    for banned in ("plt.", "matplotlib", "show_grid", "plot_history"):
        assert banned not in code, f"{path.name}: {banned!r}; build the figure in cartlib.viz"
    assert "viz.show(" in code and "viz.save_open_figures(" in code


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_figure_is_explained_before_it_is_shown(path):
    """A lesson says in markdown, right before a figure, what the reader should notice in it."""
    nb = cells(path)
    for i, c in enumerate(nb):
        if c["cell_type"] == "code" and "viz.show(" in "".join(c["source"]):
            before = nb[i - 1]
            assert before["cell_type"] == "markdown", f"{path.name}: cell {i} has no explanation"
            assert "**Notice:**" in "".join(before["source"]), f"{path.name}: cell {i - 1}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_ends_with_checks_on_what_it_measured(path):
    last = [c for c in cells(path) if c["cell_type"] == "code"][-1]
    source = "".join(last["source"])
    assert "assert " in source, f"{path.name}: the last cell must check the saved numbers"


def test_live_kernel_runs_notebook_05_changes_a_parameter_and_reruns(tmp_path):
    """As a reader does in JupyterLab: run all, add `seed = 1` to the parameters cell, run again
    from there (the kernel keeps every variable of the first run), then try a misspelt name."""
    from jupyter_client.manager import start_new_kernel

    code = ["".join(c["source"]) for c in cells(ROOT / "notebooks" / "05_sampling.ipynb")
            if c["cell_type"] == "code"]  # fmt: skip
    km, kc = start_new_kernel(kernel_name="cartlib", cwd=str(ROOT))

    def run(source: str) -> dict:
        return kc.execute_interactive(source, timeout=600, output_hook=lambda m: None)["content"]

    def value(expr: str) -> str:
        out = []
        kc.execute_interactive(
            f"print(repr({expr}))",
            timeout=60,
            output_hook=lambda m: out.append(m["content"].get("text", "")),
        )
        return "".join(out).strip()

    try:
        here = f"\nprogress = False\nrun_dir = {str(tmp_path)!r}\n"
        for source in [code[0] + here, *code[1:]]:
            assert run(source)["status"] == "ok"
        assert value("params.seed") == "42"
        for source in [code[0] + here + "seed = 1\n", *code[1:]]:
            assert run(source)["status"] == "ok", source[:80]
        assert value("params.seed") == "1"
        saved = json.loads((tmp_path / "results.json").read_text())["05_sampling"]
        assert saved["seed"] == 1
        run(code[0] + here + "sede = 1\n")
        refused = run(code[1])
        assert refused["status"] == "error" and refused["ename"] == "ConfigError"
        assert "'sede'" in refused["evalue"] and "seed" in refused["evalue"]
    finally:
        km.shutdown_kernel(now=True)


PUBLISHED = ROOT / "papermill_runs" / "defaults"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_the_published_executed_copy_is_this_notebook_run_without_errors(path):
    """`make publish` commits every notebook executed at its defaults, for reading without
    running (README's notebook table links them). A copy whose code differs from the notebook
    is stale: run `make publish` (or `python -m cartlib run-series --preset defaults --only NN`)."""
    copy = PUBLISHED / path.name
    assert copy.is_file(), f"{copy} is missing: run `make publish`"
    ran = json.loads(copy.read_text())
    code = [c for c in ran["cells"] if c["cell_type"] == "code"]
    injected = [c for c in code if "injected-parameters" in c["metadata"].get("tags", [])]
    source = ["".join(c["source"]) for c in cells(path) if c["cell_type"] == "code"]
    assert ["".join(c["source"]) for c in code if c not in injected] == source, (
        f"{copy.name} is stale (its code differs from {path.name}): run `make publish`"
    )
    outputs = [o for c in code for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{copy.name} has an error"
    assert all(c["execution_count"] for c in code), f"{copy.name}: a cell did not run"
    if "viz.show(" in "\n".join(source):  # the figures a reader comes for
        figures = [o for o in outputs if {"image/png", "image/jpeg"} & set(o.get("data", {}))]
        assert figures, f"{copy.name}: no figure"
    assert copy.stat().st_size < 2_000_000, f"{copy.name}: over 2 MB (series.shrink_outputs)"


# ------------------------------------------------------- published copies read well (issue 36)
# A published copy has no progress-bar fragment, widget, widget repr or machine path, shows its
# figures at >= 150 dpi (PNG; JPEG only for photographs), and every comparison it prints holds.
# They are rebuilt by `make publish` (series.publish_outputs runs on every executed copy).
MACHINE_PATH = re.compile(r"(?<![\w.~>])/(?:home|root|tmp|work|Users|private|mnt|scratch)/")
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"
CHAIN = re.compile(rf"{NUMBER}(?:\s+(?:<=|>=|<|>|=)\s+{NUMBER})+")


def published_texts(path):
    """(cell index, text) of every printed output and text representation of a published copy."""
    for i, cell in enumerate(json.loads((PUBLISHED / path.name).read_text())["cells"]):
        for out in cell.get("outputs", []):
            if out["output_type"] == "stream":
                yield i, "".join(out["text"])
            for key in ("text/plain", "text/markdown", "text/html"):
                if key in out.get("data", {}):
                    yield i, "".join(out["data"][key])
            if out["output_type"] == "error":
                yield i, "\n".join(out["traceback"])


def debris(path) -> list[str]:
    found = []
    for i, text in published_texts(path):
        for bad in ("%|", "VBox(children=", "HBox(", "Output()"):
            if bad in text:
                found.append(f"cell {i}: {bad!r} in {text[:80]!r}")
        found += [f"cell {i}: machine path in {text[:120]!r}" for _ in MACHINE_PATH.finditer(text)]
    return found


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_the_published_copy_has_no_progress_bar_widget_or_machine_path(path):
    copy = json.loads((PUBLISHED / path.name).read_text())
    widgets = [c for c in copy["cells"] for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]  # fmt: skip
    assert not widgets, f"{path.name}: a widget a page without a kernel cannot show"
    assert "widgets" not in copy["metadata"]
    assert not debris(path), "\n".join(debris(path)[:10])
    meta = copy["metadata"].get("papermill", {})
    assert not any(MACHINE_PATH.search(str(v)) for v in meta.values())


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_every_comparison_the_published_copy_prints_holds(path):
    """ "a < b < c" printed by a notebook must be true of the numbers as printed (a notebook
    computes its signs with cartlib.viz.core.compare rather than joining with " < ")."""
    ops = {"<": float.__lt__, ">": float.__gt__, "<=": float.__le__, ">=": float.__ge__,
           "=": float.__eq__}  # fmt: skip
    false = []
    for i, text in published_texts(path):
        for chain in CHAIN.finditer(text):
            parts = chain.group().split()
            for a, op, b in zip(parts[::2], parts[1::2], parts[2::2]):
                if not ops[op](float(a), float(b)):
                    false.append(f"cell {i}: {a} {op} {b} in {chain.group()!r}")
    assert not false, f"{path.name} prints false comparisons: {false}"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_the_precision_line_is_printed_only_where_the_notebook_trains(path):
    schema, _ = NOTEBOOKS[path.stem]
    printed = any("training on " in t for _, t in published_texts(path))
    assert printed == trains(schema()), f"{path.name}: 'training on ...' line (params.trains)"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_published_figures_are_sharp(path):
    """Figures are rendered at >= 150 dpi (viz.core.FIGURE_DPI) and shown at their own size (the
    width in the output's metadata); a JPEG only where the figure shows photographs."""
    from PIL import Image

    copy = json.loads((PUBLISHED / path.name).read_text())
    for i, cell in enumerate(copy["cells"]):
        for out in cell.get("outputs", []):
            for kind in ("image/png", "image/jpeg"):
                if kind not in out.get("data", {}):
                    continue
                size = out.get("metadata", {}).get(kind, {})
                assert "width" in size, f"{path.name} cell {i}: a figure without display size"
                raw = base64.b64decode(out["data"][kind])
                width = Image.open(io.BytesIO(raw)).size[0]
                assert width >= 1.45 * size["width"], f"{path.name} cell {i}: under 150 dpi"


def test_publish_outputs_leaves_what_a_reader_without_a_kernel_needs(tmp_path):
    """A papermill run's debris, as nbclient saves it: a tqdm widget (its final labels in the
    widget state), tqdm's text in a stream, a live panel (its first image in the bundle, or
    only in the widget state), machine paths in text, a traceback and papermill's metadata."""
    from cartlib.viz.core import PANEL_NOTE

    def widget(model, text="", **data):
        view = {"model_id": model, "version_major": 2, "version_minor": 0}
        return {"output_type": "display_data", "metadata": {},
                "data": {"application/vnd.jupyter.widget-view+json": view,
                         "text/plain": text, **data}}  # fmt: skip

    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "state": state}

    png = _png(8)
    state = {
        "bar": model("HBoxModel", children=["IPY_MODEL_l", "IPY_MODEL_p", "IPY_MODEL_r"]),
        "l": model("HTMLModel", value="train (order 3):\u2007100%"),
        "p": model("FloatProgressModel", value=150, max=150, bar_style="success"),
        "r": model("HTMLModel", value="\u2007150/150\u2007[00:58&lt;00:00,\u2007 2.57it/s]"),
        "panel": model("VBoxModel", children=["IPY_MODEL_row", "IPY_MODEL_img"]),
        "row": model("HBoxModel", children=[]),
        "img": {**model("ImageModel"), "buffers": [{"path": ["value"], "data": png,
                                                    "encoding": "base64"}]},
    }  # fmt: skip
    root, home = str(ROOT), str(Path.home())
    outputs = [
        widget("bar", "train (order 3):   0%|          | 0/150 [00:00<?, ?it/s]"),
        widget("gone", "extract:   0%|          | 0/512 [00:00<?, ?img/s]"),
        {"output_type": "stream", "name": "stderr",
         "text": "decompose:   0%|  | 0/8 [00:00<?, ?img/s]\rdecompose: 100%|##| 8/8 "
                 "[01:02<00:00,  7.9img/s]\nnext line\n"},
        {"output_type": "stream", "name": "stdout",
         "text": f"saved {root}/papermill_runs/smoke/results.json and {home}/.cache/x.pth\n"
                 "/tmp/ipykernel_1/2.py:1: UserWarning\n"},
        widget("other", "VBox(children=(HBox(children=(IntSlider(...", **{"image/png": png}),
        widget("panel", "VBox(children=(HBox(children=(Dropdown(..."),
        {"output_type": "error", "ename": "E", "evalue": "",
         "traceback": [f"File {root}/cartlib/x.py, line 1"]},
    ]  # fmt: skip
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
                     "outputs": outputs}],
          "metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {"state": state}},
                       "papermill": {"input_path": f"{root}/notebooks/x.ipynb"}},
          "nbformat": 4, "nbformat_minor": 4}  # fmt: skip
    path = tmp_path / "copy.ipynb"
    path.write_text(json.dumps(nb))
    counts = publish_outputs(path, ROOT)
    out = json.loads(path.read_text())
    texts = [o.get("text") or o["data"].get("text/plain") for o in out["cells"][0]["outputs"]
             if o["output_type"] != "error"]  # fmt: skip
    assert texts[:4] == [
        "train (order 3): 150/150 in 58 s (2.57 it/s)\n",
        "extract: 512 img (its final state was not saved)\n",
        "decompose: 8/8 in 62 s (7.9 img/s)\nnext line\n",
        "saved papermill_runs/smoke/results.json and ~/.cache/x.pth\n<tmp>/ipykernel_1/2.py:1: "
        "UserWarning\n",
    ]
    assert texts[4:] == [PANEL_NOTE] * 4  # each panel: the note, then its image
    images = [o["data"].get("image/png") for o in out["cells"][0]["outputs"][5:9:2]]
    assert images == [png, png]
    assert out["cells"][0]["outputs"][-1]["traceback"] == ["File cartlib/x.py, line 1"]
    assert out["metadata"]["papermill"]["input_path"] == "notebooks/x.ipynb"
    assert "widgets" not in out["metadata"]
    assert counts == {"progress bars": 3, "panels": 2, "paths": 4}


def _png(size, seed=0):
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_shrink_outputs_stores_only_a_large_photograph_as_jpeg_and_drops_widget_state(tmp_path):
    from PIL import Image

    big, small = _png(400), _png(16)
    photo = {"image/png": {"width": 267, "height": 267, "photo": True}}
    nb = {
        "cells": [
            {"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
             "outputs": [{"output_type": "display_data", "metadata": photo,
                          "data": {"image/png": big, "text/plain": "<Figure>"}},
                         {"output_type": "display_data", "metadata": {},
                          "data": {"image/png": big}},
                         {"output_type": "display_data", "metadata": {},
                          "data": {"image/png": small}}]},
        ],
        "metadata": {"widgets": {"state": {"x": "y" * 1000}}}, "nbformat": 4, "nbformat_minor": 4,
    }  # fmt: skip
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    before, after = shrink_outputs(path)
    out = json.loads(path.read_text())
    first, detail, tiny = out["cells"][0]["outputs"]
    assert set(first["data"]) == {"image/jpeg", "text/plain"}
    assert first["metadata"] == {"image/jpeg": {"width": 267, "height": 267}}
    assert detail["data"] == {"image/png": big} and tiny["data"] == {"image/png": small}
    assert "widgets" not in out["metadata"] and after < before
    Image.open(io.BytesIO(base64.b64decode(first["data"]["image/jpeg"]))).verify()


def test_shrink_outputs_stores_a_very_large_figure_as_a_near_lossless_jpeg(tmp_path):
    """A non-photo figure over max_png_kib (01's decomposition of photographs, 2 MB as PNG)
    becomes a quality-95 4:4:4 JPEG when that halves it: errors of a level or two of 255."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 600)[None, :, None] + rng.normal(0, 6, (600, 600, 3))
    pixels = ramp.clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    size = {"image/png": {"width": 400, "height": 400}}
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
                     "outputs": [{"output_type": "display_data", "metadata": size,
                                  "data": {"image/png": png}}]}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 4}  # fmt: skip
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert len(buf.getvalue()) > 400 * 1024
    shrink_outputs(path, max_png_kib=400)
    (out,) = json.loads(path.read_text())["cells"][0]["outputs"]
    assert set(out["data"]) == {"image/jpeg"}
    assert out["metadata"] == {"image/jpeg": size["image/png"]}
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["data"]["image/jpeg"]))))
    # white noise is JPEG's worst case (rms 4 here); 01's real figure: rms 1.8, max 23 levels
    assert np.sqrt(((back.astype(float) - pixels) ** 2).mean()) < 5
    path.write_text(json.dumps(nb))  # under the threshold it stays PNG
    shrink_outputs(path, max_png_kib=4096)
    assert set(json.loads(path.read_text())["cells"][0]["outputs"][0]["data"]) == {"image/png"}


def test_normalise_metadata_writes_what_the_kernel_reports_and_nothing_else(tmp_path):
    source = ROOT / "notebooks" / "07_attention_maps.ipynb"
    nb = json.loads(source.read_text())
    nb["metadata"]["language_info"] = {"name": "python"}  # as the notebooks were committed
    path = tmp_path / source.name
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    assert normalise_metadata(path) and not normalise_metadata(path)
    out = json.loads(path.read_text())
    assert out["cells"] == nb["cells"]
    assert out["metadata"]["language_info"] == language_info()
    assert out["metadata"]["kernelspec"]["name"] == "cartlib"


def test_figures_are_rendered_sharp_and_photographs_marked():
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cartlib.viz.core import FIGURE_DPI, compare, figure_png, photo_like

    fig, axes = plt.subplots(1, 4, figsize=(4, 1), dpi=100)
    for ax in axes:
        ax.imshow(np.random.default_rng(0).random((8, 8, 3)))
    data, meta = figure_png(fig)
    from PIL import Image

    width = Image.open(io.BytesIO(data)).size[0]
    assert FIGURE_DPI >= 150 and abs(width * 100 / FIGURE_DPI - meta["width"]) <= 1
    assert meta.get("photo") is True and photo_like(fig)
    fig.detail_gain = 12.0  # an amplified detail strip: never a JPEG
    assert not photo_like(fig)
    axes[0].images[0].set_data(np.zeros((8, 8)))  # a colour-mapped panel
    del fig.detail_gain
    assert not photo_like(fig)
    plt.close(fig)
    assert compare(0.385, 0.474, 0.473, decimals=3) == "0.385 < 0.474 > 0.473"
    assert compare(2.0, 2.0, 1.004, 1.001, decimals=2) == "2.000 = 2.000 > 1.004 > 1.001"


def test_a_run_records_each_notebooks_runtime_in_its_copy_and_beside_it(tmp_path):
    """Issue 36: the per-notebook runtime, measured by `make publish`, in the executed copy's
    header and in runtimes.json (the README's table quotes it)."""
    from cartlib.series import RUNTIMES, record_runtime

    nb = nbformat.v4.new_notebook()
    header = "# 05\n\n*Runtime at the defaults: see the table.*"
    nb.cells = [nbformat.v4.new_markdown_cell(header)]
    path = tmp_path / "05_sampling.ipynb"
    nbformat.write(nb, path)
    runtimes = record_runtime(path, 42.4)
    assert runtimes["05_sampling"]["seconds"] == 42
    assert json.loads((tmp_path / RUNTIMES).read_text()) == runtimes
    header = nbformat.read(path, as_version=4).cells[0].source
    assert "Runtime at the defaults: 42 s for this copy (" in header and "README" in header


def test_the_readme_runtime_table_quotes_the_published_runtimes():
    """Every runtime the README's notebook table gives for this release's published copies is the
    one `make publish` recorded in papermill_runs/defaults/runtimes.json."""
    table = ROOT / "papermill_runs" / "defaults" / "runtimes.json"
    if not table.exists():
        pytest.skip("no published runtimes yet (make publish writes them)")
    runtimes = json.loads(table.read_text())
    readme = (ROOT / "README.md").read_text()
    for name, entry in runtimes.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| {name[:2]} |"))
        assert f"{entry['seconds']} s" in row, (name, entry, row)
