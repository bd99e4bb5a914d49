"""Notebook parameters: one schema per numbered notebook, checked strictly, mapped to a RunConfig.

Notebooks take their parameters as plain assignments in the cell tagged ``parameters``. The next
cell calls :func:`notebook_config`, which collects them, checks them against the notebook's
schema (papermill itself only warns about unknown names) and builds the run's
:class:`~cartlib.config.RunConfig`: the preset, then every parameter that was given.

In a kernel (JupyterLab, papermill, nbval) the values are read from what the parameters cell
last set, found in IPython's input history ``In``, not from the variables the kernel holds: the
notebook's own variables (``run_dir`` made a Path, a loop's ``label``) do not count, a line
removed from the cell is forgotten, and a typo is refused by its name until it is fixed. So a
notebook can be run, edited and re-run from its parameters cell, or from the config cell, as
often as one likes.

A new parameter touches two places: its schema here and the notebook's parameters cell. It maps to
the config setting of the same name (``dataset`` -> ``data.dataset``, ``depth`` -> ``ar.depth``)
unless :data:`ALIASES` says otherwise.
"""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cartlib import hardware
from cartlib.config import (
    SECTIONS,
    ConfigError,
    RunConfig,
    _check_value,
    _unknown,
    load_preset,
    preset_for_depth,
)

# parameter names that differ from the setting they override
ALIASES = {
    "data_root": "data.root",
    "tokenizer_steps": "tokenizer.steps",
    "ar_steps": "ar.steps",
    "tokenizer_init_from": "tokenizer.init_from",
}


_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_INJECTED = "# Parameters"  # the first line of the cell papermill injects after the parameters cell
_ARITHMETIC = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.operator, ast.unaryop,
               ast.List, ast.Tuple, ast.Dict, ast.Set, ast.Load)  # fmt: skip


def _namespace_params(namespace: dict[str, Any]) -> dict[str, Any]:
    """The plain values in a namespace (no history to read the parameters cell from)."""
    out = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if isinstance(value, (types.ModuleType, types.FunctionType, type)) or callable(value):
            continue
        out[name] = value
    return out


def _assignments(source: str) -> dict[str, ast.expr] | None:
    """``name -> expression`` of a cell made of ``name = value`` lines only (comments aside),
    in order (a name assigned twice: the last); None for any other cell."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    out = {}
    for stmt in tree.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
        if not isinstance(stmt, (ast.Assign, ast.AnnAssign)) or stmt.value is None:
            return None
        if len(targets) != 1 or not isinstance(targets[0], ast.Name):
            return None
        out[targets[0].id] = stmt.value
    return out


def _is_parameters_cell(source: str, names: set[str]) -> bool:
    """A parameters cell: plain assignments that set one of ``names`` (a typo on one line leaves
    the others), or papermill's injected cell, whatever names it sets."""
    found = _assignments(source)
    return found is not None and (bool(found.keys() & names) or _is_injected(source))


def _is_injected(source: str) -> bool:
    return source.lstrip().startswith(_INJECTED)


def _value(name: str, node: ast.expr, namespace: dict[str, Any]) -> Any:
    """The value a parameters-cell line sets: a literal, or arithmetic on literals (``2 * 150``),
    computed again; any other expression ran in the kernel moments ago: its value is read there."""
    if all(isinstance(n, _ARITHMETIC) for n in ast.walk(ast.Expression(node))):
        code = compile(ast.fix_missing_locations(ast.Expression(node)), "<parameters>", "eval")
        return eval(code, {"__builtins__": {}})
    return namespace.get(name)


def parameters_from_history(history: list[str], names: set[str], namespace: dict) -> dict | None:
    """What the parameters cell last set, read from the kernel's input history ``In``: the
    assignments of the most recent cell run that is a parameters cell (one that sets a name of
    ``names``), and where that is papermill's injected cell, the parameters cell before it under
    it. None when the history holds no parameters cell. The kernel's namespace is consulted only
    for a line that is not a plain value, so a notebook variable named like a parameter, a name
    since removed from the cell or a typo since fixed no longer count."""
    found = [i for i, s in enumerate(history) if _is_parameters_cell(s, names)]
    if not found:
        return None
    last = found[-1]
    cells = [history[last]]
    if _is_injected(history[last]) and last - 1 in found and not _is_injected(history[last - 1]):
        cells.insert(0, history[last - 1])
    lines = {k: v for source in cells for k, v in _assignments(source).items()}
    return {name: _value(name, node, namespace) for name, node in lines.items()}


def validate_params(schema: type, namespace: dict[str, Any]) -> Any:
    """Check a notebook's parameters against ``schema`` (a dataclass) and return an instance.

    The parameters are those the parameters cell last set, found in the kernel's input history
    (:func:`parameters_from_history`; JupyterLab's and papermill's kernels keep it); without a
    history (a plain dict, a script) the plain values of ``namespace``. Unknown names (a typo,
    or a parameter of another notebook) and wrong types raise a :class:`ConfigError` naming the
    value and the fix; papermill alone would only warn. A name not set keeps the schema's default.
    """
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    history = namespace.get("In")
    given = None
    if isinstance(history, list):
        given = parameters_from_history(history, names, namespace)
    if given is None:
        given = _namespace_params(namespace)
    values = {}
    for key, value in given.items():
        if key not in names:
            raise _unknown(f"parameter of this notebook ({schema.__name__})", key, names)
        values[key] = _check_value(key, value, hints[key])
    return schema(**values)


def run_config_from_params(params: Any, mapping: dict[str, str]) -> RunConfig:
    """Preset ``params.preset`` with every non-None notebook parameter named in ``mapping``
    (parameter name -> ``section.field``) applied on top."""
    overrides: dict[str, Any] = {}
    for pname, target in mapping.items():
        value = getattr(params, pname)
        if value is None:
            continue
        node = overrides
        *path, last = target.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    order = getattr(params, "order", None)
    if order is not None and getattr(params, "quantizer", None) is None and "order" in mapping:
        # a notebook's `order` alone picks the tokenizer that goes with it, as cfg.with_order
        # does: 0 is VAR's multi-scale tokenizer, >= 1 the base-detail one (an explicit
        # `quantizer` that contradicts the order is still refused, naming both)
        quantizer = "base_detail" if order > 0 else "multiscale"
        overrides.setdefault("tokenizer", {})["quantizer"] = quantizer
    return load_preset(params.preset, **overrides)


# ---------------------------------------------------------------- notebook parameter schemas
# One dataclass per notebook: field names and defaults equal the notebook's `parameters` cell
# (tests/test_notebooks.py checks it). A parameter whose default is None overrides the RunConfig
# setting of the same name (``PREFER`` picks the section when several have it; ``ALIASES`` map
# other names); every other parameter belongs to the notebook alone.
@dataclass
class DecompositionParams:  # 01_mumford_shah_decomposition
    preset: str = "smoke"
    dataset: str | None = None
    resolution: int | None = None
    order: int | None = None
    alpha: float | None = None
    lam: float | None = None
    eps: float | None = None
    n_images: int = 4
    run_dir: str = "papermill_runs/smoke"
    seed: int = 0
    progress: bool = True


@dataclass
class TokenizerParams:  # 02_train_tokenizer
    PREFER: ClassVar = ("tokenizer",)
    preset: str = "tiny"
    quantizer: str | None = None
    order: int | None = None
    codebook_size: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    beta: float | None = None
    w_lpips: float | None = None
    w_gan: float | None = None
    gan_start: int | None = None
    w_base: float | None = None
    mixed_precision: str | None = None
    dataset: str | None = None
    resolution: int | None = None
    compare_base_loss: bool = False
    n_show: int = 8
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True


@dataclass
class TokenizationParams:  # 03_tokenization
    PREFER: ClassVar = ("tokenizer",)
    preset: str = "tiny"
    dataset: str | None = None
    order: int | None = None
    steps: int | None = None
    n_eval: int = 256
    n_show: int = 4
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.order == 0:  # the comparison needs details; order 0's tokenizer is one of the four
            raise ConfigError(
                "order=0 is out of range here: notebook 03 compares the base-detail tokenizer of "
                "an order >= 1 with the vanilla and multi-scale (order 0) ones; choose 1 .. 5"
            )


@dataclass
class TrainARParams:  # 04_train_ar
    PREFER: ClassVar = ("ar",)
    preset: str = "tiny"
    depth: int | None = None
    dataset: str | None = None
    resolution: int | None = None
    order: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None
    data_root: str | None = None
    tokenizer_init_from: str | None = None
    gpu_mem_gib: float | None = None
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = ""
    main_process_port: int = 29500
    rehearse: str = ""
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        # `-p depth 30` on the small default preset means CART-d30 (cart-d30-256)
        self.preset = preset_for_depth(self.preset, self.depth)
        if self.rehearse not in ("", "quick", "full"):
            raise ConfigError(
                f"rehearse={self.rehearse!r}: choose 'quick' (~2 min), 'full' (~10-15 min) or "
                "'' (no rehearsal)"
            )


@dataclass
class SamplingParams:  # 05_sampling
    preset: str = "tiny"
    dataset: str | None = None
    data_root: str | None = None
    tokenizer_init_from: str | None = None
    guidance: float = 2.0
    cfg_schedule: str = "linear"
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    n_per_class: int = 4
    grid_classes: int = 10
    seed: int = 42
    sweep: bool = True
    adm_reference: str = ""
    fid_per_class: int = 50
    check_claims: bool = True
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("n_per_class", "grid_classes", "fid_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range: must be >= 1")


@dataclass
class AblationParams:  # 06_ablation_decomposition_order
    preset: str = "tiny"
    dataset: str | None = None
    orders: list[int] = field(default_factory=lambda: [0, 3])
    flat_base: bool = False
    train_seeds: list[int] = field(default_factory=lambda: [0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    n_samples: int = 50
    n_reference: int = 200
    guidance: float | None = None
    adm_reference: str = ""
    tokenizer_steps: int | None = None
    ar_steps: int | None = None
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True


@dataclass
class AttentionParams:  # 07_attention_maps
    preset: str = "tiny"
    dataset: str | None = None
    data_root: str | None = None
    layer: int = -1
    label: int = 0
    seed: int = 42
    n_compare: int = 6
    var_preset: str = ""
    var_run_dir: str = ""
    check_claims: bool = True
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_compare < 1:
            raise ConfigError(f"n_compare={self.n_compare} is out of range: must be >= 1")


@dataclass
class HighResParams:  # 08_high_resolution_and_super_resolution
    preset: str = "tiny"
    dataset: str = "photos"
    scale: int = 2
    n_images: int = 8
    guidance: float = 2.0
    compare_var: bool = False
    n_fid: int = 0
    n_sr: int = 16
    tokenizer_steps: int | None = None
    ar_steps: int | None = None
    seed: int = 42
    retrain: bool = False
    run_dir: str = "papermill_runs/tiny"
    progress: bool = True

    def __post_init__(self) -> None:
        # the seam score compares pixel pairs across the 4-scale-pixel phase of the detail
        # patches; the 32-px window must hold whole phases, which only 2, 4 and 8 give
        if self.scale not in (2, 4, 8):
            raise ConfigError(f"scale={self.scale} is out of range: choose 2, 4 or 8")


@dataclass
class EditParams:  # 09_recolour_relight_inpaint
    preset: str = "smoke"
    dataset: str = "photos"
    shading_steps: int = 2
    specular_order: int = 4
    lighting_depth: int = 1
    hue: float = 120.0
    n_images: int = 6
    guidance: float = 2.0
    inpaint_preset: str = "tiny"
    tokenizer_steps: int | None = None
    ar_steps: int | None = None
    seed: int = 42
    retrain: bool = False
    run_dir: str = "papermill_runs/smoke"
    progress: bool = True


SCHEMAS: dict[str, type] = {
    "01_mumford_shah_decomposition": DecompositionParams,
    "02_train_tokenizer": TokenizerParams,
    "03_tokenization": TokenizationParams,
    "04_train_ar": TrainARParams,
    "05_sampling": SamplingParams,
    "06_ablation_decomposition_order": AblationParams,
    "07_attention_maps": AttentionParams,
    "08_high_resolution_and_super_resolution": HighResParams,
    "09_recolour_relight_inpaint": EditParams,
}


def config_targets(schema: type) -> dict[str, str]:
    """Parameter name -> ``section.field`` of every config override of ``schema`` (the fields
    whose default is None), by :data:`ALIASES`, else by name (sections in ``schema.PREFER``
    order first)."""
    run = RunConfig()
    top = {f.name for f in dataclasses.fields(run)} - set(SECTIONS) - {"name"}
    prefer = (*getattr(schema, "PREFER", ()), *SECTIONS)
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not None:
            continue
        if f.name in ALIASES:
            out[f.name] = ALIASES[f.name]
        elif f.name in top:
            out[f.name] = f.name
        else:
            section = next((s for s in prefer if hasattr(getattr(run, s), f.name)), None)
            if section is None:
                raise ConfigError(
                    f"{schema.__name__}.{f.name} defaults to None (a config override) but no "
                    "setting has that name: add it to params.ALIASES or give it a default"
                )
            out[f.name] = f"{section}.{f.name}"
    return out


NOTEBOOKS: dict[str, tuple[type, dict[str, str]]] = {
    name: (schema, config_targets(schema)) for name, schema in SCHEMAS.items()
}


def notebook_config(notebook: str, namespace: dict[str, Any]) -> tuple[Any, RunConfig]:
    """Validate the parameters a notebook's kernel holds and build its RunConfig.

    The config comes with its precision resolved for this machine (``auto``:
    :mod:`cartlib.hardware`), and the line saying which device and precision training here uses
    is printed. Call it in the cell right after the ``parameters`` cell::

        params, cfg = notebook_config("01_mumford_shah_decomposition", globals())
    """
    if notebook not in NOTEBOOKS:
        raise _unknown("notebook", notebook, NOTEBOOKS)
    schema, mapping = NOTEBOOKS[notebook]
    params = validate_params(schema, namespace)
    cfg = run_config_from_params(params, mapping)
    if trains(params):
        print(hardware.describe(cfg.mixed_precision))
    return params, cfg.resolved()


def trains(params: Any) -> bool:
    """Whether the notebook trains at these parameters, so its first line says on what device
    and in what precision: 01 trains nothing; a notebook with a ``retrain`` parameter opens
    cartlib's shipped checkpoints unless it is set (where none is shipped, ``runs.ensure_*``
    says so as it trains); the others train what they show."""
    return not isinstance(params, DecompositionParams) and getattr(params, "retrain", True)
