"""A dress rehearsal of a full-scale launch on the machine at hand (``python -m cartlib
rehearse``; notebook 04 with ``-p rehearse quick|full``).

A CART-d30 run is ~584,000 steps on 16 GPUs: weeks of a cluster. The edges such a run reaches
(the history at 584k steps, its last save and the consolidated export, a rank that dies, the
resume, a problem one machine sees alone, the layout the plan chose, the command each machine
runs) are where it breaks, and on a cluster they break after the queue and the bill. The
rehearsal runs the launch the plan prints, in its real shape, here, in minutes:

1. **plan** — exactly as the cluster would be planned (machines x GPUs x GPU memory): the layout
   (micro-batch, accumulation, FSDP2 or DDP, checkpointing), the per-GPU memory at the real
   width, and ``launch-config.yaml`` and the SLURM script written into the run directory;
2. **the same stages through the same commands** — ``accelerate launch -m cartlib <stage>`` per
   machine as :func:`cartlib.cluster.node_commands` prints them, local gloo processes standing in
   for the machines (:data:`LOCAL`), into ``<run_dir>/rehearsal``: the real token schedule and
   sequence length, the real data path over the user's image folder or a synthetic
   ImageNet-shaped one, the planned layout, the real step count and recipe, and the width
   (``quick``: also the depth) shrunk to what a CPU trains (:func:`shrunk`). In order:
   train-tokenizer (``quick``: a tokenizer of random weights is installed instead),
   extract-tokens, train-ar for one step (a real checkpoint, sharded under FSDP), the step counter
   fast-forwarded to the last steps of the real run (:func:`fast_forward`), train-ar with one
   machine missing its data (every process must stop within :data:`KILL_LIMIT_S`, saying which),
   train-ar with one rank killed mid-step (likewise), train-ar resumed to the last step (the
   final save and the consolidated export), the export loaded without a process group, and
   (``full``) sampling over every process;
3. a **table** (:meth:`Report.table`) of what ran and whether it passed, with the planned memory
   and the commands to submit.

Notebook 04 runs its closing cells on the rehearsed run (the CLI runs it last). What a CPU cannot
show: GPU kernels, nccl, real memory and speed (``benchmarks/gpu_check.py`` on the first GPU),
and learning (a few steps of a narrow model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import resource
except ImportError:  # Windows
    resource = None

from cartlib import hardware, launch, runs, train
from cartlib.cluster import Cluster, node_commands
from cartlib.config import RunConfig, load_config, save_config
from cartlib.data.synthetic import make_image_folder
from cartlib.io import atomic_write_bytes, load_checkpoint, resolve_run_dir
from cartlib.model.transformer import compile_on
from cartlib.tokenizer import Tokenizer
from cartlib.train.checkpoints import (
    HISTORY,
    MANIFEST,
    read_history,
    read_manifest,
    save_checkpoint,
    stage_state,
)
from cartlib.train.loop import MAX_HISTORY

MODES = ("quick", "full")
LOCAL = {"quick": (2, 1), "full": (2, 2)}  # local "machines" x processes on each, per mode
WIDTH, HEADS = 64, 1  # the transformer's width here (head dim 64, where CPU attention is best)
QUICK_DEPTH = 2
IMAGES = {"quick": 4, "full": 16}  # training images (one class each)
LAST_STEPS = 2  # the real run's last steps, trained here
KILL_LIMIT_S = 60.0  # every process of a launch ends this soon after one of them failed
REPORT = "rehearsal.json"


@dataclass
class Row:
    name: str
    ok: bool | None  # None: informational
    seconds: float
    detail: str
    # the largest resident memory of one process of the rehearsal so far (this process or any
    # finished one it started, launched ranks included), GB: the step where it rises set it
    peak_gb: float | None = None


@dataclass
class Report:
    preset: str
    mode: str
    key: str  # what it stands for (:func:`key`): the launch's config and topology, the mode
    run_dir: Path  # <run_dir>/rehearsal
    rows: list[Row] = field(default_factory=list)
    submit: list[str] = field(default_factory=list)  # the real launch, one command per machine

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok is not False for r in self.rows)

    @property
    def config(self) -> RunConfig:
        """The rehearsed run's config (the launch config its processes read)."""
        return load_config(self.run_dir / "launch-config.yaml")

    def table(self) -> str:
        lines = ["| step | result | seconds | largest process so far | what |",
                 "|---|---|---|---|---|"]  # fmt: skip
        for r in self.rows:
            result = {True: "pass", False: "**FAIL**", None: "-"}[r.ok]
            detail = r.detail.replace("|", "/").replace("\n", " ")
            peak = "" if r.peak_gb is None else f"{r.peak_gb:.1f} GB"
            lines.append(f"| {r.name} | {result} | {r.seconds:.0f} | {peak} | {detail} |")
        verdict = "every step passed" if self.ok else "a step FAILED: mend it before submitting"
        lines += ["", f"Rehearsal of {self.preset} ({self.mode}): {verdict}."]
        if self.submit:
            lines += ["", "The launch (one command per machine, or the SLURM script):"]
            lines += [f"    {c}" for c in self.submit]
        return "\n".join(lines)

    def save(self) -> Path:
        path = self.run_dir / REPORT
        data = {"preset": self.preset, "mode": self.mode, "key": self.key, "ok": self.ok,
                "rows": [r.__dict__ for r in self.rows], "submit": self.submit}  # fmt: skip
        atomic_write_bytes(path, json.dumps(data, indent=1).encode())
        return path


def peak_rss_gb() -> float | None:
    """The largest resident set of this process or of any finished process it started (their
    descendants included, as each parent waited for them), in GB; None where the OS has no
    getrusage. Linux reports KiB, macOS bytes."""
    if resource is None:  # Windows
        return None
    peak = max(resource.getrusage(who).ru_maxrss
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))  # fmt: skip
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


class Failed(Exception):
    """A rehearsal step did not do what a real launch must; the message says what."""


def key(cfg: RunConfig, cluster: Cluster, mode: str) -> str:
    """What a rehearsal report stands for: the launch's config and topology, and the mode."""
    parts = [str(cfg.to_dict()), str(cluster.num_processes), str(cluster.num_machines), mode]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def previous(cfg: RunConfig, cluster: Cluster, run_dir, mode: str) -> Report | None:
    """The passed rehearsal of exactly this launch in ``run_dir`` (notebook 04 reuses the one
    ``python -m cartlib rehearse`` just ran), or None."""
    rdir = resolve_run_dir(run_dir, create=False) / "rehearsal"
    try:
        data = json.loads((rdir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key(cfg, cluster, mode) or not data.get("ok"):
        return None
    report = Report(data["preset"], data["mode"], data["key"], rdir, submit=data["submit"])
    report.rows = [Row(**r) for r in data["rows"]]
    return report


# ------------------------------------------------------------------------------ the shrunk run
def shrunk(cfg: RunConfig, fit, mode: str, data_root: Path, n_images: int) -> RunConfig:
    """The rehearsal's launch config: ``cfg`` (the cluster plan's, with its layout) on
    :data:`LOCAL` processes at :data:`WIDTH` (``quick``: :data:`QUICK_DEPTH` blocks), with the
    same schedule, vocabulary, layout switches (FSDP, checkpointing, and accumulation when the
    plan accumulates), step count and recipe; one image per micro-batch; the tokenizer's
    architecture and losses at 32 channels; bf16 only where this CPU runs it natively."""
    machines, ranks = LOCAL[mode]
    world = machines * ranks
    accumulation = 2 if fit is not None and fit.accumulation > 1 else 1
    ar = {"width": WIDTH, "heads": HEADS, "micro_batch": 1, "batch_size": world * accumulation}
    # the blocks compiled as the GPUs will run them (ar.compile auto: on CUDA), with the planned
    # FSDP and checkpointing; quick: eager (compiling costs each process ~30 s on a CPU)
    ar["compile"] = mode == "full" and compile_on(cfg.ar.compile, "cuda")
    if mode == "quick":
        ar["depth"] = QUICK_DEPTH
    tok = {"channels": 32 if cfg.tokenizer.arch == "var" else 8, "batch_size": world,
           "micro_batch": None, "steps": 2, "gan_start": 0}  # fmt: skip
    data = {"root": str(data_root), "train_limit": n_images, "test_limit": 4, "shard_size": 4,
            "views": 1 if mode == "quick" else 2, "workers": 1}  # fmt: skip
    precision = cfg.mixed_precision if hardware.precision("auto") == cfg.precision else "no"
    return cfg.updated(ar=ar, tokenizer=tok, data=data, sample={"per_class": 1},
                       num_processes=world, mixed_precision=precision)  # fmt: skip


def synthetic_images(folder: Path, n: int, resolution: int) -> Path:
    """An ImageNet-shaped folder (``train/<class>/<image>``: JPEG and PNG files a little larger
    than the training resolution, as VAR's crop expects), one image per class, written once."""
    if not (folder / "train").is_dir():
        side = int(resolution * 1.25)
        make_image_folder(folder, images=n, val_images=n, classes=n, sizes=(side, 2 * side))
    return folder


def install_random_tokenizer(cfg: RunConfig, rdir: Path) -> Path:
    """``quick``: the tokenizer of ``cfg`` with random weights (codebook marked initialised),
    written as a finished stage, where training it would cost the rehearsal minutes."""
    torch.manual_seed(cfg.tokenizer.seed)
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, cfg.data.resolution)
    tok.quantizer.initialized.fill_(True)
    folder = train.tokenizer_dir(rdir, cfg.resolved())
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg.resolved(), folder / "config.yaml")
    state = {"step": cfg.tokenizer.steps, "modules": {"tokenizer": tok.state_dict()}, "history": []}
    save_checkpoint(folder, state)
    return folder


def fast_forward(folder: Path, step: int, total: int) -> int:
    """Relabel the newest checkpoint of the stage folder ``folder`` (a run's first steps) as the
    checkpoint of ``step`` of a ``total``-step run: the step counter, the learning-rate
    schedule's position and the sharded checkpoint's folder name move, and the history becomes
    as long as ``step`` steps leave it (one entry per ceil(total / MAX_HISTORY) steps, each a copy
    of the first step's logs). The weights, optimizer moments (AdamW's own step counts
    included) and RNG states stay. -> the history's length."""
    entry = read_manifest(folder)[0]
    state = load_checkpoint(folder / entry["file"])
    shards = None
    if "sharded" in state:
        new = f"step-{step:08d}.dcp"
        os.replace(folder / state["sharded"], folder / new)
        state["sharded"], shards = new, entry["shards"]["files"]
    every = max(1, -(-total // MAX_HISTORY))
    first = state["history"][0]
    state["history"] = [{**first, "step": s} for s in range(every - 1, step, every)]
    state["step"] = step
    for sched in state.get("schedulers", {}).values():
        sched.update(last_epoch=step, _step_count=step + 1)
    (folder / MANIFEST).unlink()
    (folder / entry["file"]).unlink()
    save_checkpoint(folder, state, shards=shards)
    atomic_write_bytes(folder / HISTORY, json.dumps(state["history"]).encode())
    return len(state["history"])


# ------------------------------------------------------------------------------ local machines
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            launch.FULL_SCALE_ON_CPU: "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip


def machine_commands(cfg: RunConfig, mode: str, stage: str, config: Path, rdir: Path):
    """The commands :func:`~cartlib.cluster.node_commands` prints for ``stage``, one per local
    machine (machine 0 at 127.0.0.1, a free port), run by this interpreter."""
    machines = LOCAL[mode][0]
    cluster = Cluster(cfg.num_processes, machines, 0, "127.0.0.1", _free_port())
    out = []
    for line in node_commands(cluster, stage, config, rdir, cfg.mixed_precision):
        args = shlex.split(line)
        out.append([sys.executable, "-m", "accelerate.commands.launch", *args[2:]])
    return out


@dataclass
class Launch:
    codes: list[int]
    logs: list[str]
    seconds: float
    after_failure: float | None = None  # seconds from the failure to the last process's end


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in task.read_text().split()]
    return out


def run_machines(commands, rdir: Path, name: str, cwds=None, kill_on=None, timeout=1800.0):
    """Start one command per local machine at once (each must be up for the rendezvous) and wait
    for all. ``kill_on``: once a log shows this text, SIGKILL one process of the last machine
    (a rank lost mid-step: out of memory, a node gone) and time how long the rest take to end;
    a launch still running :data:`KILL_LIMIT_S` x 2 after a failure is stopped."""
    logs = [rdir / f"{name}-machine{r}.log" for r in range(len(commands))]
    procs, t0, failed_at = [], time.time(), None
    cwds = cwds or [None] * len(commands)
    for cmd, log, cwd in zip(commands, logs, cwds, strict=True):
        f = open(log, "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                       cwd=cwd, start_new_session=True), f))  # fmt: skip
    try:
        while any(p.poll() is None for p, _ in procs):
            now = time.time()
            if now - t0 > timeout:
                raise Failed(f"{name} did not end within {timeout:.0f} s")
            if failed_at is None and any(p.poll() not in (None, 0) for p, _ in procs):
                failed_at = now  # a machine failed: the others must follow it soon
            if kill_on and failed_at is None:
                ranks = _children(procs[-1][0].pid)
                if ranks and any(kill_on in log.read_text() for log in logs):
                    os.kill(ranks[0], signal.SIGKILL)
                    failed_at = now
            if failed_at is not None and now - failed_at > 2 * KILL_LIMIT_S:
                break
            time.sleep(0.2)
    finally:
        for p, f in procs:
            if p.poll() is None:  # still running: stopped (a failed rehearsal step)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            f.close()
    ended = time.time()
    texts = [log.read_text() for log in logs]
    if failed_at is None and any(p.returncode for p, _ in procs):
        failed_at = ended  # every machine ended within one look: at once
    after = None if failed_at is None else ended - failed_at
    return Launch([p.returncode for p, _ in procs], texts, ended - t0, after)


def _tail(text: str, n: int = 4) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-n:])[-600:]


def _all_ok(launched: Launch, what: str) -> str:
    for i, code in enumerate(launched.codes):
        if code:
            raise Failed(f"{what}: machine {i} exited {code}: {_tail(launched.logs[i])}")
    return f"{len(launched.codes)} machines, exit 0"


# ------------------------------------------------------------------------------ the rehearsal
def rehearse(cfg: RunConfig, cluster: Cluster, run_dir, mode: str = "full", data_root=None,
             log=print) -> Report:  # fmt: skip
    """Rehearse the launch of ``cfg`` on ``cluster`` (see the module docstring) into
    ``<run_dir>/rehearsal``; ``data_root``: an image folder to read (its first images), else a
    synthetic one. -> the :class:`Report` (also ``<run_dir>/rehearsal/rehearsal.json``)."""
    if mode not in MODES:
        raise ValueError(f"rehearse={mode!r}: choose 'quick' (~2 min) or 'full' (~10-15 min)")
    run_dir = resolve_run_dir(run_dir)
    rdir = run_dir / "rehearsal"
    rdir.mkdir(parents=True, exist_ok=True)
    report = Report(cfg.name, mode, key(cfg, cluster, mode), rdir)
    steps = _Steps(report, log)
    with contextlib.suppress(_Stop):
        _rehearse(steps, cfg, cluster, run_dir, rdir, mode, data_root)
    report.save()
    return report


class _Stop(Exception):
    """The rehearsal ends at a failed step (the steps after it depend on it)."""


class _Steps:
    """Runs the rehearsal's steps in order, each timed into a :class:`Row`."""

    def __init__(self, report: Report, log):
        self.report, self.log = report, log

    @contextlib.contextmanager
    def step(self, name: str):
        row = Row(name, True, 0.0, "")
        t0 = time.time()
        self.log(f"rehearsal: {name} ...")
        try:
            yield row
        except Failed as e:
            row.ok, row.detail = False, str(e)
        except Exception as e:  # anything else a real launch would also have died of
            row.ok, row.detail = False, f"{type(e).__name__}: {e}"
        row.seconds = time.time() - t0
        row.peak_gb = peak_rss_gb()
        self.report.rows.append(row)
        self.report.save()
        verdict = {True: "pass", False: "FAIL", None: "-"}[row.ok]
        self.log(f"rehearsal: {name}: {verdict} ({row.seconds:.0f} s) {row.detail}")
        if row.ok is False:
            raise _Stop


def _rehearse(steps: _Steps, cfg, cluster, run_dir: Path, rdir: Path, mode: str, data_root):
    report = steps.report
    with steps.step("plan") as row:
        with _cpu_full_scale():  # this machine's lack of GPUs is not the plan's problem
            plan = runs.plan_ar(cfg, run_dir, cluster)
        report.submit = list(plan.node_commands)
        if plan.slurm_script is not None:
            report.submit.append(f"sbatch {plan.slurm_script}")
        # the data is the one thing the rehearsal brings its own of (said in the data row)
        data_problems = [p for p in plan.problems if p.startswith("data.root")]
        problems = [p for p in plan.problems if p not in data_problems]
        if problems:
            raise Failed("; ".join(problems))
        layout = plan.fit.describe() if plan.fit else "in-process (not a cluster run)"
        row.detail = (f"{plan.n_params / 1e6:,.0f}M parameters, L = {plan.seq_len}, "
                      f"{cluster.num_machines} x {cluster.per_machine} GPUs of "
                      f"{cfg.gpu_mem_gib:g} GB: {layout}; launch-config.yaml written")  # fmt: skip

    with steps.step("data") as row:
        n = IMAGES[mode]
        given = Path(data_root).expanduser() if data_root else None
        if given is not None and given.is_dir():
            root, row.detail = given, f"the first {n} images of {given}"
        else:
            root = synthetic_images(rdir / "images", n, cfg.data.resolution)
            row.detail = f"a synthetic ImageNet-shaped folder, {n} images"
            if data_problems:
                row.ok = None  # the real launch needs it: said, the rehearsal goes on
                row.detail += "; for the real launch: " + "; ".join(data_problems)
    rcfg = shrunk(plan.config, plan.fit, mode, root, n)
    config = rdir / "launch-config.yaml"
    save_config(rcfg, config)
    machines, ranks = LOCAL[mode]
    a = rcfg.ar
    with steps.step("shrunk") as row:
        row.ok = None
        sched = rcfg.schedule()
        row.detail = (f"{machines} machines x {ranks} processes; depth {a.depth}, width "
                      f"{a.model_width}, the real schedule ({sched.n_steps} maps, L = "
                      f"{sched.seq_len}) and {a.steps:,} steps; micro-batch 1 x "
                      f"{a.batch_size // rcfg.num_processes} accumulation, "
                      f"{'FSDP2' if a.fsdp else 'DDP'}, checkpointing {a.grad_ckpt}, compiled "
                      f"blocks {a.compile}, precision {rcfg.precision}")  # fmt: skip
    commands = lambda stage: machine_commands(rcfg, mode, stage, config, rdir)  # noqa: E731

    with steps.step("train-tokenizer") as row:
        if mode == "quick":
            install_random_tokenizer(rcfg, rdir)
            row.detail = "quick: a tokenizer of random weights installed"
        else:
            row.detail = _all_ok(run_machines(commands("train-tokenizer"), rdir, "tokenizer"),
                                 "train-tokenizer")  # fmt: skip
    with steps.step("extract-tokens") as row:
        row.detail = _all_ok(run_machines(commands("extract-tokens"), rdir, "extract"),
                             "extract-tokens")  # fmt: skip
    folder = train.ar_dir(rdir, rcfg.resolved())
    with steps.step("train-ar: first step") as row:
        first_cmds = [[*c, "--stop-after", "1"] for c in commands("train-ar")]
        _all_ok(run_machines(first_cmds, rdir, "train-first"), "train-ar --stop-after 1")
        state = stage_state(folder, a.steps)
        if state.step != 1:
            raise Failed(f"{folder} holds step {state.step} after one step")
        files = read_manifest(folder)[0].get("shards", {}).get("files", {})
        row.detail = (f"a checkpoint of step 1, sharded into {len(files)} files" if files
                      else "a checkpoint of step 1 (one file: DDP)")  # fmt: skip
    at = a.steps - LAST_STEPS
    with steps.step("fast-forward") as row:
        entries = fast_forward(folder, at, a.steps)
        row.detail = (f"step 1 relabelled step {at:,} of {a.steps:,}: a history of {entries:,} "
                      f"entries (<= {MAX_HISTORY:,}), as a run that long keeps")  # fmt: skip
    with steps.step("a machine without its data") as row:
        row.detail = _one_machine_without_data(rcfg, mode, rdir)
    with steps.step("a rank killed mid-step") as row:
        launched = run_machines(commands("train-ar"), rdir, "train-killed",
                                kill_on=f"resuming from step {at}")  # fmt: skip
        _after_failure(launched, "a killed rank")
        state = stage_state(folder, a.steps)
        if state.step != at:
            raise Failed(f"after the kill {folder} holds step {state.step}, not {at}")
        row.detail = (f"every process ended {launched.after_failure:.0f} s after the kill "
                      f"(limit {KILL_LIMIT_S:.0f}), exit codes {launched.codes}; the checkpoint "
                      f"of step {at:,} intact")  # fmt: skip
    with steps.step("resume to the last step") as row:
        launched = run_machines(commands("train-ar"), rdir, "train-resumed")
        _all_ok(launched, "train-ar (resumed)")
        state = stage_state(folder, a.steps)
        history = read_history(folder)
        if not state.finished or history[-1]["step"] != a.steps - 1:
            raise Failed(f"{folder}: {state.status} at step {state.step}, history ends at "
                         f"{history[-1]['step']}")  # fmt: skip
        resumed = f"resuming from step {at}" in "".join(launched.logs)
        if not resumed:
            raise Failed("the relaunch did not say it resumed from the fast-forwarded step")
        row.detail = (f"resumed at {at:,}, finished at {a.steps:,}; the history holds "
                      f"{len(history):,} entries up to step {history[-1]['step']:,}")  # fmt: skip
    with steps.step("export") as row:
        tok = train.load_tokenizer(train.tokenizer_dir(rdir, rcfg.resolved()))
        model = train.load_ar(folder, tok)
        row.detail = (f"the consolidated export ({model.num_params() / 1e6:.2f}M parameters) "
                      "loads in one process without a process group")  # fmt: skip
    with steps.step("sample") as row:
        if mode == "quick":  # a launch's worth of time (tests/test_data_scale.py launches it)
            row.ok, row.detail = None, "quick: not run (full: sampling over every process)"
            return
        sample = [[*c, "--per-class", "1", "--batch", "2"] for c in commands("sample")]
        _all_ok(run_machines(sample, rdir, "sample"), "sample")
        pngs = list(folder.glob("samples-*/png/*.png"))
        if len(pngs) != model.num_classes:
            raise Failed(f"{len(pngs)} sample images, {model.num_classes} classes")
        row.detail = f"{len(pngs)} images (1 per class) drawn over {rcfg.num_processes} processes"


def _after_failure(launched: Launch, what: str) -> None:
    if launched.after_failure is None:
        raise Failed(f"{what}: nothing failed (exit codes {launched.codes})")
    if not any(launched.codes):
        raise Failed(f"{what}: every machine exited 0")
    if launched.after_failure > KILL_LIMIT_S:
        raise Failed(
            f"{what}: the processes took {launched.after_failure:.0f} s to end after it "
            f"(limit {KILL_LIMIT_S:.0f} s): a cluster would sit idle"
        )


def _one_machine_without_data(rcfg: RunConfig, mode: str, rdir: Path) -> str:
    """train-ar where the last machine does not have the data (a relative data.root, seen from
    another folder there): every process must stop soon, and machine 0 must say why."""
    elsewhere = rdir / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    root = Path(rcfg.data.root)
    local = rcfg.updated(data={"root": os.path.relpath(root, rdir)})
    config = rdir / "launch-config-relative.yaml"
    save_config(local, config)
    commands = machine_commands(rcfg, mode, "train-ar", config, rdir)
    cwds = [rdir] * (len(commands) - 1) + [elsewhere]
    launched = run_machines(commands, rdir, "train-no-data", cwds=cwds)
    _after_failure(launched, "a machine without its data")
    if "does not exist on" not in launched.logs[0]:
        raise Failed(f"machine 0 did not say why: {_tail(launched.logs[0])}")
    return (f"every process stopped {launched.after_failure:.0f} s after machine "
            f"{len(commands) - 1} found no data (exit codes {launched.codes}); machine 0 "
            "printed its reason")  # fmt: skip


@contextlib.contextmanager
def _cpu_full_scale():
    before = os.environ.get(launch.FULL_SCALE_ON_CPU)
    os.environ[launch.FULL_SCALE_ON_CPU] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(launch.FULL_SCALE_ON_CPU)
        else:
            os.environ[launch.FULL_SCALE_ON_CPU] = before
