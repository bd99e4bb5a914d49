"""The committed notebooks: clean (no outputs), and their `parameters` cells match the schemas
that validate them. (Executing them is the nbval pass of `make test`.)"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from cartlib.params import NOTEBOOKS

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
