"""Scale-out: decide where a training run goes, and launch it there.

A notebook never forks CUDA work itself. :func:`plan_ar` looks at the config and the machine:

* ``in-process`` — small runs (the smoke/tiny presets): trained right here, on CPU or one GPU;
* ``launch`` — full-scale runs on a machine with GPUs: the config is written to the run
  directory and ``accelerate launch -m cartlib train-ar --config ...`` runs it; the notebook
  streams its output and reads the run directory back afterwards;
* ``explain`` — a full-scale run on a machine without the GPUs it needs (or data that is not
  here): the whole config is validated (schedule, model size, data location, memory) and
  :func:`explain_and_stop` prints what it would need and the exact command to run elsewhere, then
  raises :class:`NothingTrainedError` — never a silent tiny run, and never a success exit code
  (papermill, ``python -m cartlib train-ar``) for a run that trained nothing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cartlib.cluster import Cluster, node_commands, slurm_script
from cartlib.config import RunConfig, save_config
from cartlib.data import imagefolder_num_classes, load_dataset_from_config
from cartlib.fit import (
    GIB,
    HEADROOM,
    Fit,
    choose_fit,
    choose_tokenizer_fit,
    tokenizer_activation_probe,
    tokenizer_memory,
    training_memory,
)
from cartlib.io import atomic_write_bytes
from cartlib.model import build_model
from cartlib.model.transformer import attention_path

# A run is "full scale" when its transformer or images are beyond what a CPU trains in minutes.
FULL_SCALE_DEPTH = 12
FULL_SCALE_RESOLUTION = 128
FULL_SCALE_ON_CPU = "CARTLIB_FULL_SCALE_ON_CPU"


class NothingTrainedError(RuntimeError):
    """A training that was asked for cannot run here; the explanation was printed before."""


@dataclass
class Plan:
    mode: str  # in-process | launch | explain
    n_params: int
    seq_len: int
    schedule: str
    gpus_needed: int
    gpu_mem_gib: float  # estimated peak per GPU (training), of the chosen layout
    command: str  # this machine's command (rank ``cluster.machine_rank``)
    problems: list[str] = field(default_factory=list)
    fit: Fit | None = None  # micro-batch x accumulation x sharding x checkpointing (full scale)
    cluster: Cluster = field(default_factory=Cluster)
    node_commands: list[str] = field(default_factory=list)  # one per machine, rank 0 first
    slurm_script: Path | None = None  # written into the run directory for multi-node runs
    config: RunConfig | None = None  # the run's config with the chosen layout (what is launched)

    def summary(self) -> str:
        lines = [
            f"mode: {self.mode}",
            f"transformer: {self.n_params / 1e6:.1f}M parameters, {self.seq_len} tokens per image",
            f"schedule: {self.schedule}",
            f"needs: {self.gpus_needed} GPU(s) on {self.cluster.num_machines} machine(s), "
            f"~{self.gpu_mem_gib:.0f} GiB each (estimate)",
        ]
        if self.fit is not None:
            lines.append(f"layout per GPU: {self.fit.describe()}")
        if len(self.node_commands) > 1:
            lines += [f"machine {r}: {c}" for r, c in enumerate(self.node_commands)]
        else:
            lines.append(f"command: {self.command}")
        if self.slurm_script is not None:
            lines.append(f"SLURM: sbatch {self.slurm_script}")
        lines += [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def full_scale(cfg: RunConfig) -> bool:
    return cfg.ar.depth >= FULL_SCALE_DEPTH or cfg.data.resolution >= FULL_SCALE_RESOLUTION


def _num_classes(cfg: RunConfig) -> int:
    """The dataset's class count when it can be read here, else ImageNet's 1000. An image folder
    is counted by its class folders: planning must not open every validation image."""
    try:
        if cfg.data.dataset == "imagefolder":
            return imagefolder_num_classes(cfg.data.root or os.environ["CART_DATA_DIR"])
        return load_dataset_from_config(cfg.data, "test", progress=False).num_classes
    except Exception:  # not on this machine: planning must still work
        return 1000


def _memory_precision(cfg: RunConfig) -> str:
    """The precision a run's memory is estimated in: fp32 only when asked for (``auto`` means
    bf16 on the GPUs a full-scale run is planned for)."""
    return "no" if cfg.mixed_precision == "no" else "bf16"


def _layout(cfg: RunConfig, n_params: int, seq_len: int) -> tuple[Fit | None, str | None]:
    """The cheapest layout of a full-scale run on ``num_processes`` GPUs of ``gpu_mem_gib``."""
    a = cfg.ar
    try:
        fit = choose_fit(
            n_params, a.depth, a.model_width, seq_len, cfg.tokenizer.codebook_size,
            a.batch_size, cfg.num_processes, cfg.gpu_mem_gib, _memory_precision(cfg),
            attention=attention_path(a.attention, "cuda"),
        )  # fmt: skip
    except ValueError as e:
        return None, str(e)
    return fit, None


def _peak_gib(cfg: RunConfig, n_params: int, seq_len: int) -> float:
    """:func:`cartlib.fit.training_memory` of ``cfg``'s layout on its GPUs (GiB per GPU), with
    the attention path it trains with on CUDA."""
    a, world = cfg.ar, cfg.num_processes
    local = max(1, a.batch_size // world)
    micro = min(a.micro_batch or local, local)
    return training_memory(
        n_params, a.depth, a.model_width, seq_len, cfg.tokenizer.codebook_size, micro, world,
        a.fsdp, a.grad_ckpt, _memory_precision(cfg), local // micro,
        attention=attention_path(a.attention, "cuda"),
    )["total"] / GIB  # fmt: skip


def _stated_layout(cfg: RunConfig, n_params: int, seq_len: int) -> tuple[Fit, str | None]:
    """The layout ``cfg`` states (``ar.micro_batch`` set: the plan's, written into the launch
    config every rank reads, or one set by hand), its memory estimate, and a problem when it
    does not split the batch or does not fit ``gpu_mem_gib``."""
    a, world = cfg.ar, cfg.num_processes
    local = max(1, a.batch_size // world)
    micro = min(a.micro_batch, local)
    fit = Fit(micro, local // micro, a.fsdp, a.grad_ckpt, _peak_gib(cfg, n_params, seq_len))
    if a.batch_size % world or local % micro:
        return fit, (
            f"ar.micro_batch={a.micro_batch} does not split batch_size={a.batch_size} over "
            f"{world} processes into whole micro-batches: set ar.micro_batch to null to let the "
            "plan choose, or a divisor of the per-process batch"
        )
    if fit.peak_gib > HEADROOM * cfg.gpu_mem_gib:
        return fit, (
            f"the stated layout ({fit.describe()}) needs more than {HEADROOM:.0%} of "
            f"gpu_mem_gib={cfg.gpu_mem_gib:g}: set ar.micro_batch to null to let the plan choose"
        )
    return fit, None


def plan_tokenizer(cfg: RunConfig, world: int, say: bool = True) -> RunConfig:
    """``cfg`` with the tokenizer's micro-batch for ``world`` processes on GPUs of
    ``gpu_mem_gib``: at full scale, the largest that fits by :func:`cartlib.fit.tokenizer_memory`
    (its activations measured for this architecture), the rest of the per-GPU batch accumulated;
    a micro-batch set in the config is kept (and its estimate said). Small runs are unchanged.
    A GPU too small for one image is a ValueError before anything trains. ``say``: print it."""
    if not full_scale(cfg):
        return cfg
    t, res = cfg.tokenizer, cfg.data.resolution
    where = "cuda" if torch.cuda.is_available() else "cpu"
    probe = tokenizer_activation_probe(cfg, _memory_precision(cfg), device=where)
    if t.micro_batch is None:
        fit = choose_tokenizer_fit(probe, res, t.batch_size, world, cfg.gpu_mem_gib)
        cfg = cfg.updated(tokenizer={"micro_batch": fit.micro_batch})
    local = max(1, t.batch_size // world)
    micro = min(cfg.tokenizer.micro_batch, local)
    peak = tokenizer_memory(probe, res, micro, world)["total"] / GIB
    if say:
        print(
            f"tokenizer layout per GPU: micro-batch {micro} x {-(-local // micro)} accumulation "
            f"step(s) of {local} images ({res}px, {probe['trained_params'] / 1e6:.0f}M trained "
            f"parameters): ~{peak:.1f} GiB (estimate; gpu_mem_gib={cfg.gpu_mem_gib})",
            flush=True,
        )
    return cfg


def cpu_full_scale() -> bool:
    """Whether full-scale configs may train on CPUs here (``CARTLIB_FULL_SCALE_ON_CPU=1``): the
    code path a cluster runs, at small width, for tests and for debugging on a workstation."""
    return os.environ.get(FULL_SCALE_ON_CPU, "") == "1"


def plan_ar(
    cfg: RunConfig, run_dir: str | Path, cluster: Cluster | None = None, write: bool = True
) -> Plan:
    """Validate ``cfg`` completely and decide where its transformer training runs: here, through
    ``accelerate launch`` on this machine's GPUs, or (explain) elsewhere — with the layout that
    fits the GPUs' memory, the command for every machine and, for several, a SLURM script.

    ``cluster``: the machines the run is planned for; by default the one this process was
    launched into (:meth:`Cluster.from_env`: inside a rank of a multi-node launch), else one
    machine with ``cfg.num_processes`` processes. ``write``: write the launch config and the
    SLURM script into ``run_dir`` (not from inside launched ranks: they read them)."""
    launched = Cluster.from_env() if cluster is None else None
    if launched is not None:  # inside a rank: the launch decides the count (a step is the same)
        cluster, cfg = launched, cfg.updated(num_processes=launched.num_processes)
    cluster = cluster or Cluster(cfg.num_processes)
    if cluster.num_processes != cfg.num_processes:
        raise ValueError(
            f"the cluster runs {cluster.num_processes} processes, the config "
            f"num_processes={cfg.num_processes}: they must agree"
        )
    schedule = cfg.schedule()
    model = build_model(cfg, schedule, _num_classes(cfg), device="meta")
    n_params = model.num_params()
    problems = []
    fit = None
    if full_scale(cfg) and cfg.ar.micro_batch is None:  # else the config states its layout
        fit, problem = _layout(cfg, n_params, schedule.seq_len)
        problems += [problem] if problem else []
        if fit is not None:
            layout = {"micro_batch": fit.micro_batch, "fsdp": fit.fsdp}
            cfg = cfg.updated(ar={**layout, "grad_ckpt": fit.checkpointing})
    elif full_scale(cfg):  # a launch config (the plan's layout), or a layout set by hand
        fit, problem = _stated_layout(cfg, n_params, schedule.seq_len)
        problems += [problem] if problem else []
    peak = _peak_gib(cfg, n_params, schedule.seq_len)
    if cfg.data.dataset == "imagefolder" and not cfg.data.root:
        problems.append(
            "data.root is not set: point it at an ImageNet folder in ImageFolder layout "
            "(papermill -p data_root /path/to/imagenet)"
        )
    elif cfg.data.root and not Path(cfg.data.root).expanduser().exists():
        problems.append(f"data.root={cfg.data.root!r} does not exist on this machine")
    gpus = torch.cuda.device_count()
    need = cfg.num_processes if full_scale(cfg) else 0
    if full_scale(cfg) and gpus < 1 and cpu_full_scale():
        pass  # CPU processes over gloo, by request: the cluster's code path at small width
    elif full_scale(cfg) and gpus < 1:
        problems.append(
            f"this is a full-scale run ({n_params / 1e6:.0f}M parameters, "
            f"{cfg.data.resolution}px): it needs CUDA GPUs (the paper used 16 A100s; this preset "
            f"asks for {cfg.num_processes} processes) and this machine has none (to run its code "
            f"path on CPUs anyway, at a width they can train, set {FULL_SCALE_ON_CPU}=1)"
        )
    elif full_scale(cfg) and gpus < cluster.per_machine:
        problems.append(
            f"{cluster.per_machine} processes per machine but only {gpus} GPU(s) here: pass "
            f"-p num_processes {gpus * cluster.num_machines} (the layout keeps the global batch)"
        )
    run_dir = Path(run_dir)
    config_path = run_dir / "launch-config.yaml"
    mp = cfg.mixed_precision
    nodes = node_commands(cluster, "train-ar", config_path, run_dir, mp)
    slurm = None
    if cluster.num_machines > 1 and write:
        slurm = run_dir / "train-ar.slurm"
        script = slurm_script(cluster, "train-ar", config_path, run_dir, mp, f"cart-{cfg.name}")
        atomic_write_bytes(slurm, script.encode())
        save_config(cfg, config_path)  # every machine reads the same config from shared disk
    mode = "explain" if problems else ("launch" if full_scale(cfg) else "in-process")
    return Plan(
        mode, n_params, schedule.seq_len, schedule.describe(), need, peak,
        nodes[cluster.machine_rank], problems, fit, cluster, nodes, slurm, cfg,
    )  # fmt: skip


def launch(plan: Plan, cfg: RunConfig, run_dir: str | Path) -> int:
    """Write the config (with the plan's layout) and run ``plan.command``, streaming its output;
    returns the exit code."""
    save_config(plan.config or cfg, Path(run_dir) / "launch-config.yaml")
    return stream(shlex.split(plan.command))


def stream(args: list[str]) -> int:
    """Run ``args`` (``accelerate launch ...`` through this interpreter, so that a kernel
    without the environment's ``bin`` on its PATH finds it), streaming its output; -> exit code."""
    print(f"$ {shlex.join(args)}", flush=True)
    if args[:2] == ["accelerate", "launch"]:
        args = [sys.executable, "-m", "accelerate.commands.launch", *args[2:]]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
        return proc.wait()
    except BaseException:  # Ctrl-C, a papermill timeout: no rank is left holding the GPUs
        stop_group(proc)
        raise


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """End the launcher ``proc`` and every process it started (its own session): SIGINT, as a
    Ctrl-C would (a training process saves its step), then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def explain(plan: Plan) -> None:
    """Print why ``plan`` cannot train here and how to run it elsewhere."""
    print("Not training here. What it needs:\n- " + "\n- ".join(plan.problems))
    if len(plan.node_commands) > 1:
        where = "\n".join(f"  machine {r}: {c}" for r, c in enumerate(plan.node_commands))
        print(f"\nOn the machines that have it, one command each:\n{where}", flush=True)
        if plan.slurm_script is not None:
            print(f"or with SLURM: sbatch {plan.slurm_script}", flush=True)
    else:
        print(f"\nOn a machine that has it:\n  {plan.command}", flush=True)


def explain_and_stop(plan: Plan) -> None:
    """:func:`explain`, then raise :class:`NothingTrainedError` so that the notebook run
    (papermill) fails instead of reporting success for a run that trained nothing."""
    explain(plan)
    raise NothingTrainedError(
        f"nothing was trained ({len(plan.problems)} problem(s), printed above): "
        + "; ".join(plan.problems)
    )


def agreed_problems(problems: list[str]) -> list[str]:
    """Under a launcher: every process's planning problems, each named by its process and
    machine, on every process (one collective), so that a problem one machine sees alone (its
    data.root missing, too few GPUs) stops every process at once instead of leaving the others
    waiting in the first collective of training until the timeout. Else ``problems``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problems
    mine = (int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))), problems)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if not any(p for _, p in every):
        return []
    seen: dict[str, list[str]] = {}
    for rank, (machine, found) in enumerate(every):
        for p in found:
            seen.setdefault(p, []).append(f"{rank} (machine {machine})")
    return [f"{p} [process(es) {', '.join(who)}]" for p, who in seen.items()]


def fail_fast(code: int) -> int:
    """After an error in a launched process: end this process now with ``code`` (no barrier and
    no teardown that waits for the others), so that the launcher stops this machine's other
    processes and the other machines' collectives fail instead of waiting out the timeout.
    Outside a launcher: ``code``, returned."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def leave_process_group() -> None:
    """Under a launcher, once every process has finished its work: close the process group
    (gloo's threads left running at interpreter exit sometimes abort a process that had
    finished its work, and then the launch fails). Nothing to do in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
