"""Multi-node launch commands and the SLURM batch script."""

from __future__ import annotations

import shlex
import subprocess
from types import SimpleNamespace

import pytest

from cartlib.cluster import Cluster, node_commands, slurm_script


def test_one_machine_needs_no_rendezvous():
    (cmd,) = node_commands(Cluster(8), "train-ar", "c.yaml", "runs/x", "bf16")
    # --multi_gpu: else a default accelerate config with distributed_type NO starts 1 process
    assert cmd.startswith(
        "accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m cartlib"
    )
    assert "--machine_rank" not in cmd and cmd.endswith("--config c.yaml --run-dir runs/x")
    (one,) = node_commands(Cluster(1), "train-ar", "c.yaml", "runs/x", "auto")
    assert one.startswith("accelerate launch --num_processes 1 -m cartlib")


def test_a_launched_rank_knows_its_cluster_from_the_launcher():
    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}  # fmt: skip
    c = Cluster.from_env(env)
    assert (c.num_processes, c.num_machines, c.machine_rank, c.per_machine) == (16, 2, 1, 8)
    assert (c.main_process_ip, c.main_process_port) == ("10.0.0.1", 29400)
    assert Cluster.from_env({}) is None  # not launched


def test_each_rank_of_a_two_node_launch_plans_its_own_node_and_writes_nothing(
    tmp_path, monkeypatch
):
    """Inside rank 9 of 16 on two 8-GPU nodes, ``train-ar``'s plan must not count 16 processes
    on one machine (it did: every rank of every multi-node run exited 3 before training)."""
    from cartlib.config import load_preset
    from cartlib.launch import plan_ar

    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1", "RANK": "9",
           "MASTER_ADDR": "10.0.0.1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    data = tmp_path / "imagenet"
    data.mkdir()
    cfg = load_preset("cart-d30-256", num_processes=16, data={"root": str(data)})
    plan = plan_ar(cfg, tmp_path / "run", write=False)
    assert plan.problems == [] and plan.mode == "launch", plan.summary()
    assert plan.cluster.per_machine == 8 and plan.cluster.machine_rank == 1
    assert not (tmp_path / "run").exists()  # the ranks read the launch config, never rewrite it


def test_two_nodes_get_one_command_each_with_their_rank():
    c = Cluster(16, num_machines=2, main_process_ip="10.0.0.1")
    cmds = node_commands(c, "train-ar", "c.yaml", "runs/x", "bf16")
    assert len(cmds) == 2
    for rank, cmd in enumerate(cmds):
        args = shlex.split(cmd)
        assert args[args.index("--machine_rank") + 1] == str(rank)
        assert args[args.index("--num_processes") + 1] == "16"  # all GPUs, both machines
        assert args[args.index("--main_process_ip") + 1] == "10.0.0.1"


def test_slurm_script_starts_every_node_with_its_own_rank(tmp_path):
    c = Cluster(16, num_machines=2)
    text = slurm_script(c, "train-ar", tmp_path / "my run/c.yaml", tmp_path, "bf16")
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    script = tmp_path / "run.slurm"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell
    srun = next(line for line in text.splitlines() if line.startswith("srun"))
    inner = shlex.split(srun)[-1]  # what each task's bash runs: variables expanded per task
    env = {"SLURM_NODEID": "1", "MASTER_ADDR": "node-a", "PATH": "/usr/bin:/bin"}
    echoed = subprocess.run(
        ["bash", "-c", f"echo {inner}"], env=env, capture_output=True, text=True
    ).stdout
    assert "--machine_rank 1" in echoed and "--main_process_ip node-a" in echoed
    assert "my run/c.yaml" in echoed  # a path with a space survives the quoting


def test_bad_topologies_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="multiple of num_machines=3"):
        Cluster(16, num_machines=3)
    with pytest.raises(ValueError, match="machine_rank=2 must be in 0..1"):
        Cluster(16, num_machines=2, machine_rank=2)


def test_full_scale_plan_fits_the_gpus_and_writes_commands_for_every_machine(tmp_path):
    from cartlib.config import load_preset
    from cartlib.launch import plan_ar

    cfg = load_preset("cart-d30-256", num_processes=16, gpu_mem_gib=80)
    plan = plan_ar(cfg, tmp_path, Cluster(16, num_machines=2, main_process_ip="10.0.0.1"))
    fit, launched = plan.fit, plan.config.ar
    assert fit.micro_batch * fit.accumulation * 16 == 768  # the paper's global batch is kept
    assert fit.peak_gib <= 0.9 * 80 and plan.gpu_mem_gib == pytest.approx(fit.peak_gib)
    assert (launched.micro_batch, launched.fsdp, launched.grad_ckpt) == (
        fit.micro_batch,
        fit.fsdp,
        fit.checkpointing,
    )
    assert len(plan.node_commands) == 2 and "--machine_rank 1" in plan.node_commands[1]
    assert plan.slurm_script.read_text().startswith("#!/bin/bash")
    assert (tmp_path / "launch-config.yaml").exists()  # what every machine reads
    text = plan.summary()
    assert "micro-batch" in text and "accumulation" in text and "machine 1:" in text
    small = plan_ar(cfg.updated(gpu_mem_gib=40.0), tmp_path)
    assert small.fit.fsdp or small.fit.checkpointing  # 40 GB GPUs need sharding/checkpointing


def test_the_cli_trains_with_the_plans_layout_as_the_notebook_launches_it(tmp_path, monkeypatch):
    """Issue 35, finding 1: ``train-ar --config <a cart-d30 config without a layout>`` computed
    the plan and then trained the loaded config: 48 images per GPU under DDP, out of memory at
    step 0 on a real cluster. Now the CLI trains ``plan.config``, the config the notebook writes
    into launch-config.yaml."""
    from cartlib import runs
    from cartlib.__main__ import main
    from cartlib.config import load_config, load_preset, save_config

    env = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "0", "RANK": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    data = tmp_path / "imagenet"
    data.mkdir()
    cfg = load_preset("cart-d30-256", num_processes=16, gpu_mem_gib=80, data={"root": str(data)})
    assert cfg.ar.micro_batch is None and not cfg.ar.fsdp  # the preset states no layout
    save_config(cfg, tmp_path / "run.yaml")
    trained = []
    monkeypatch.setattr(runs, "ensure_ar", lambda c, run_dir, **kw: trained.append(c))
    monkeypatch.setattr(runs, "process_state", lambda: SimpleNamespace(is_main_process=True))
    cli = ["train-ar", "--config", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path)]
    assert main(cli) == 0
    launched = runs.plan_ar(cfg, tmp_path / "nb", Cluster(16, 2, 0, "10.0.0.1")).config
    save_config(launched, tmp_path / "launched.yaml")  # what the notebook's launch writes
    assert trained == [load_config(tmp_path / "launched.yaml")]
    assert trained[0].ar.micro_batch < 768 // 16  # the layout that fits, not 48 per GPU


def test_a_finished_run_opens_where_the_plan_could_not_train_it(tmp_path, monkeypatch):
    """Issue 35, finding 4: notebook 04 could not open a finished full-scale run on a login node
    (NothingTrainedError) and, on one 8-GPU node with num_machines 2, launched it again and
    waited for machine 1: the plan never asked whether the stage was finished."""
    from test_train import ar_setup

    from cartlib import runs, train

    cfg, tok, tokens, labels = ar_setup(tmp_path, steps=2, ckpt_every=2)
    full = cfg.updated(ar={"depth": 12, "width": 64}, num_processes=16)  # a cluster-sized plan
    assert runs.plan_ar(full, tmp_path, Cluster(16, 2, 0, "10.0.0.1")).mode == "explain"
    train.train_ar(full, tmp_path, tok, tokens, labels, 8, progress=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)  # one of the two 8-GPU nodes
    for gpus in (0, 8):
        monkeypatch.setattr("torch.cuda.device_count", lambda gpus=gpus: gpus)
        plan = runs.plan_ar(full, tmp_path, Cluster(16, 2, 0, "10.0.0.1"))
        assert plan.mode == "finished" and plan.problems == []


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid`` ends (or is left a zombie) within ``seconds``."""
    import time

    for _ in range(int(seconds * 10)):
        try:
            with open(f"/proc/{pid}/status") as f:
                if "zombie" in f.read():
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_stopped_launch_leaves_no_process_behind(monkeypatch):
    """Issue 35, finding 9: Ctrl-C or a papermill timeout while ``launch.stream`` ran left the
    launched ranks running (holding the GPUs). Now the launcher's whole session is stopped."""
    import sys

    from cartlib import launch

    rank = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"
    )
    seen = []

    def write(line):
        if line.strip().isdigit():  # the run's first line (not the "$ command" echo)
            seen.append(int(line))
            raise KeyboardInterrupt  # a Ctrl-C while the run's output streams

    monkeypatch.setattr(launch.sys.stdout, "write", write)
    with pytest.raises(KeyboardInterrupt):
        launch.stream([sys.executable, "-c", rank + "; time.sleep(60)"])
    assert _gone(seen[0])  # the launched process's own child: stopped with it
