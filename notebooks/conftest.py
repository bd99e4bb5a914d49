"""The nbval pass of `make test`: after each notebook has run top to bottom, its live kernel is
used once more as a reader uses it in JupyterLab (issues 24 and 36): the config cell is run again
on its own (the kernel now holds every variable of the run, some named like parameters: the
config must still be the parameters cell's), a parameter is changed in the parameters cell and
the notebook re-run from there (the change takes), the line is removed again (the change is
forgotten), a misspelt parameter is refused by its name and, once fixed, forgotten. Extra items
per notebook, run in the notebook's own kernel after its last cell; they cost milliseconds (only
the parameters and config cells run again).

nbval sends every cell with ``store_history=False``, so its kernel's ``In`` stays empty, where
JupyterLab's (and papermill's) holds every cell run — the history ``notebook_config`` reads the
parameters cell from. The cells are sent as JupyterLab sends them here.
"""

from __future__ import annotations

import ast
import textwrap

import nbformat
import pytest


def _code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _rerun_items(parent, first_num: int):
    from nbval.plugin import IPyNbCell

    code = _code_cells(parent.nb)
    params_cell, config_cell = code[0], code[1]
    names = {n.targets[0].id for n in ast.parse(params_cell).body}
    assert "progress" in names, f"{parent.name}: the edit-and-rerun check changes `progress`"
    without = "".join(
        line for line in params_cell.splitlines(keepends=True) if not line.startswith("progress")
    )
    refused = (
        "from cartlib.config import ConfigError\n\ntry:\n"
        + textwrap.indent(config_cell, "    ")
        + (
            "\nexcept ConfigError as error:\n"
            '    assert str(error).startswith("unknown parameter"), error\n'
            "    assert \"'progres'\" in str(error) and 'progress' in str(error), error\n"
            "else:\n"
            "    raise AssertionError('a misspelt parameter (progres) was accepted')\n"
        )
    )
    check = "\nassert params == type(params)(), f'not the committed defaults: {params}'\n"
    steps = [
        ("rerun the config cell after the run", config_cell + check),
        ("edit: progress = False", params_cell + "\nprogress = False  # the reader's edit\n"),
        (
            "rerun: the change takes",
            config_cell + "\nassert params.progress is False, 'the edited parameter was lost'\n",
        ),
        ("edit: the progress line removed", without),
        (
            "rerun: a removed parameter is forgotten",
            config_cell + "\nassert params.progress is True, 'a removed line still counts'\n",
        ),
        ("edit: a misspelt name", params_cell + "\nprogres = False  # a typo\n"),
        ("rerun: the typo is refused by its name", refused),
        ("edit: the typo fixed", params_cell),
        ("rerun: the fixed typo is forgotten", config_cell + check),
    ]
    for k, (label, source) in enumerate(steps):
        cell = nbformat.v4.new_code_cell(source)
        options = {"check": False, "skip": False}
        yield IPyNbCell.from_parent(
            parent, name=f"Cell {first_num + k} ({label})", cell_num=first_num + k,
            cell=cell, options=_Options(options),
        )  # fmt: skip


class _Options(dict):
    """nbval reads cell options as a defaultdict(bool)."""

    def __missing__(self, key):
        return False


def _execute_as_jupyterlab_does(self, cell_input, allow_stdin=None):
    return self.kc.execute(
        cell_input, store_history=True, allow_stdin=allow_stdin, stop_on_error=False
    )


def pytest_configure(config):
    try:
        from nbval.kernel import RunningKernel
    except ImportError:
        return
    RunningKernel.execute_cell_input = _execute_as_jupyterlab_does


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    try:
        from nbval.plugin import IPyNbFile
    except ImportError:  # nbval not installed: nothing collected from notebooks either
        return
    out, seen = [], {}
    for item in items:
        out.append(item)
        if isinstance(item.parent, IPyNbFile):
            seen[item.parent] = len(out)  # position after this notebook's last cell so far
    for parent, end in sorted(seen.items(), key=lambda kv: -kv[1]):
        count = len(_code_cells(parent.nb))
        out[end:end] = list(_rerun_items(parent, count))
    items[:] = out
