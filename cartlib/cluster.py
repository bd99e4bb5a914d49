"""Where the processes of a run go: one machine or several, and the commands that start them.

Every printed command says ``--multi_gpu`` when it starts several processes: without it a user's
default accelerate config (``distributed_type: NO``) would start one process per machine. On
machines without GPUs the same command runs gloo processes (how the tests run it).

The training layout (micro-batch, accumulation, FSDP, checkpointing) is part of the run's config,
so every process reads it from ``launch-config.yaml``; ``accelerate launch`` only needs the
topology. For ``num_machines`` > 1 each machine runs the same command with its own
``--machine_rank``; :func:`node_commands` prints them and :func:`slurm_script` writes a batch
script that starts them with ``srun`` (one task per node, rank from ``$SLURM_NODEID``, the first
node of the allocation as the rendezvous host).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Cluster:
    num_processes: int = 1  # in all, over every machine (one per GPU)
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None  # rank 0's address; needed when num_machines > 1
    main_process_port: int = 29500

    def __post_init__(self) -> None:
        if self.num_machines < 1 or self.num_processes < 1:
            raise ValueError(
                f"num_machines={self.num_machines} and num_processes={self.num_processes} must "
                "be >= 1"
            )
        if self.num_processes % self.num_machines:
            raise ValueError(
                f"num_processes={self.num_processes} (all GPUs) must be a multiple of "
                f"num_machines={self.num_machines}: each machine runs as many processes as GPUs"
            )
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(
                f"machine_rank={self.machine_rank} must be in 0..{self.num_machines - 1}"
            )
        if not 1 <= self.main_process_port <= 65535:
            raise ValueError(f"main_process_port={self.main_process_port} must be in 1..65535")

    @property
    def per_machine(self) -> int:
        return self.num_processes // self.num_machines

    @classmethod
    def from_env(cls, env=None) -> Cluster | None:
        """The cluster this process was launched into (torchrun's variables, which
        ``accelerate launch`` sets in every rank), or None outside a launcher."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env or "LOCAL_WORLD_SIZE" not in env:
            return None
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        return cls(
            num_processes=world,
            num_machines=max(1, world // local),
            machine_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
            main_process_ip=env.get("MASTER_ADDR"),
            main_process_port=int(env.get("MASTER_PORT", "29500")),
        )


def launch_args(
    cluster: Cluster,
    stage: str,
    config_path: str | Path,
    run_dir: str | Path,
    mixed_precision: str,
    machine_rank: int | str | None = None,
    main_process_ip: str | None = None,
) -> list[str]:
    """``accelerate launch ... -m cartlib <stage>`` as an argument list; ``machine_rank`` and
    ``main_process_ip`` may be shell variables (``$SLURM_NODEID``) for a batch script."""
    args = ["accelerate", "launch"]
    if cluster.num_processes > 1:  # else a user's default config (distributed_type NO) starts one
        args.append("--multi_gpu")
    args += ["--num_processes", str(cluster.num_processes)]
    if cluster.num_machines > 1:
        rank = cluster.machine_rank if machine_rank is None else machine_rank
        ip = main_process_ip or cluster.main_process_ip or "<address of machine 0>"
        args += ["--num_machines", str(cluster.num_machines), "--machine_rank", str(rank)]
        args += ["--main_process_ip", ip, "--main_process_port", str(cluster.main_process_port)]
    if mixed_precision != "auto":  # auto: each process resolves it for its own device
        args += ["--mixed_precision", mixed_precision]
    args += ["-m", "cartlib", stage]
    return [*args, "--config", str(config_path), "--run-dir", str(run_dir)]


def node_commands(cluster: Cluster, stage, config_path, run_dir, mixed_precision) -> list[str]:
    """The shell command for each machine, rank 0 first."""
    return [
        shlex.join(launch_args(cluster, stage, config_path, run_dir, mixed_precision, rank))
        for rank in range(cluster.num_machines)
    ]


def slurm_script(
    cluster: Cluster, stage, config_path, run_dir, mixed_precision, job_name: str = "cartlib"
) -> str:
    """A SLURM batch script (``sbatch run.slurm``) that starts every machine of the run."""
    args = launch_args(
        cluster, stage, config_path, run_dir, mixed_precision, "$SLURM_NODEID", "$MASTER_ADDR"
    )
    inner = " ".join(a if a.startswith("$") else shlex.quote(a) for a in args)  # $VARs: per task
    log = Path(run_dir) / f"slurm-{stage}-%j.out"
    return "\n".join(
        [
            "#!/bin/bash",
            f"#SBATCH --job-name={job_name}",
            f"#SBATCH --nodes={cluster.num_machines}",
            "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={cluster.per_machine}",
            "#SBATCH --exclusive",
            f"#SBATCH --output={log}",
            "set -euo pipefail",
            "# rendezvous on the first node of the allocation",
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
            f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(inner)}",
            "",
        ]
    )


def stage_command(cfg, stage: str, config_path, run_dir) -> str:
    """The one-machine command of a stage of ``cfg`` (a RunConfig), for messages that say how
    to produce a missing artifact."""
    cluster = Cluster(cfg.num_processes)
    return shlex.join(launch_args(cluster, stage, config_path, run_dir, cfg.mixed_precision))
