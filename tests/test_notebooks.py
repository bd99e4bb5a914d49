"""The committed notebooks: clean (no outputs), and their `parameters` cells match the schemas
that validate them. (Executing them is the nbval pass of `make test`.)"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from cartlib.config import ConfigError
from cartlib.params import NOTEBOOKS, notebook_config

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
    shadowed = {f.name: object() for f in dataclasses.fields(schema)}  # wrong type for each
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


def test_shrink_outputs_stores_a_large_figure_as_jpeg_and_drops_widget_state(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from cartlib.series import shrink_outputs

    def png(size):
        buf = io.BytesIO()
        noise = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    big, small = png(400), png(16)
    nb = {
        "cells": [
            {"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
             "outputs": [{"output_type": "display_data", "metadata": {},
                          "data": {"image/png": big, "text/plain": "<Figure>"}},
                         {"output_type": "display_data", "metadata": {},
                          "data": {"image/png": small}}]},
        ],
        "metadata": {"widgets": {"state": {"x": "y" * 1000}}}, "nbformat": 4, "nbformat_minor": 4,
    }  # fmt: skip
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    before, after = shrink_outputs(path)
    out = json.loads(path.read_text())
    first, second = out["cells"][0]["outputs"]
    assert set(first["data"]) == {"image/jpeg", "text/plain"} and second["data"] == {
        "image/png": small
    }
    assert "widgets" not in out["metadata"] and after < before
    Image.open(io.BytesIO(base64.b64decode(first["data"]["image/jpeg"]))).verify()
