"""Start real multi-process runs on a CPU for the tests.

``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.x (``--cpu`` picks
its simple launcher; multi-CPU needs MPI there). ``--multi_gpu`` goes through torchrun instead and,
with no GPU present, every process joins a gloo group as accelerate's MULTI_CPU: that is what these
helpers run, and callers check that the processes really were several.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(args: list[str], procs: int = 2, timeout: int = 600):
    """``accelerate launch`` of ``args`` (``-m cartlib ...`` or a script) on ``procs`` CPU
    processes (one thread each, as torchrun sets); asserts success and returns the result."""
    mode = ["--multi_gpu"] if procs > 1 else ["--cpu"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes",
           str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out
