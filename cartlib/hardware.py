"""The device a run trains on and the precision it trains in, chosen from the hardware.

``mixed_precision: auto`` (the default of the small presets and of the notebooks) resolves once
per process to what the device runs natively (:func:`resolve_precision`):

* a CUDA GPU with bf16 (compute capability >= 8.0: A100, H100, RTX 30xx/40xx) -> ``bf16``;
* an older CUDA GPU (T4, V100, what free notebook services lend) -> ``fp16``, for which
  accelerate adds a gradient scaler;
* a CPU with native bf16 (avx512_bf16 or AMX, and torch/oneDNN allowed to use it) -> ``bf16``;
* anything else (AVX2-only CPUs, most laptops; Apple's mps) -> ``no`` (fp32). bf16 there is
  emulated: measured on an AVX2 CPU, a bf16 matmul runs at 0.9 GFLOP/s against 113 in fp32 and
  the smoke tokenizer trains 6x slower (``benchmarks/bench_precision.py``).

An explicit ``no``/``bf16``/``fp16`` is used as given. The device (:func:`device`) is a CUDA GPU
when there is one, else Apple's ``mps`` when a probe of every operation cartlib trains and
samples with passes on it (:func:`probe`, :mod:`cartlib.train.probe`; else the CPU, saying
why), else the CPU; ``CARTLIB_DEVICE=cpu|cuda|mps`` chooses by hand. :func:`describe` is the
line a notebook or stage prints about both. Ground floor: imports nothing of cartlib.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import torch

PRECISIONS = ("no", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the 16-bit precisions
CHOICES = ("auto", *PRECISIONS)
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which it still has its native bf16 kernels
ONEDNN_BF16_ISAS = {
    "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT",
}  # fmt: skip


# ------------------------------------------------------------------------------------- the CPU
def cpu_facts() -> dict:
    """What decides native bf16 on this CPU: the instruction sets the hardware has, the kernels
    torch dispatches to (``ATEN_CPU_CAPABILITY`` can lower it) and oneDNN's ISA cap."""
    return {
        "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() or None,
    }


def cpu_bf16(facts: dict | None = None) -> tuple[bool, str]:
    """(whether bf16 is native on this CPU, the reason in words)."""
    f = cpu_facts() if facts is None else facts
    hardware = [name for name in ("avx512_bf16", "amx") if f[name]]
    if not hardware:
        return False, f"this CPU ({f['capability']}) has no avx512_bf16 or AMX: bf16 is emulated"
    if "AVX512" not in f["capability"]:
        return False, (
            f"torch uses its {f['capability']} kernels here (ATEN_CPU_CAPABILITY), so bf16 is "
            "emulated despite the CPU's " + "/".join(hardware)
        )
    if f["onednn_isa"] is not None and f["onednn_isa"] not in ONEDNN_BF16_ISAS:
        return False, f"ONEDNN_MAX_CPU_ISA={f['onednn_isa']} caps oneDNN below its bf16 kernels"
    return True, f"this CPU runs bf16 natively ({'/'.join(hardware)})"


# ---------------------------------------------------------------------------------- the device
def probe(dev: torch.device | str, timeout: float = 300) -> str | None:
    """None when one training step of a small tokenizer and transformer, with the
    decomposition, encoding and sampling, runs on ``dev``; else what failed. Run in a fresh
    process (``python -m cartlib probe-device``): a missing kernel may crash rather than raise."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "cartlib", "probe-device", str(dev)],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "CARTLIB_DEVICE": "cpu"},  # the probe must not probe again
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"the probe took more than {timeout:.0f} s"
    if out.returncode == 0:
        return None
    lines = (out.stdout + out.stderr).strip().splitlines() or [f"exit code {out.returncode}"]
    return lines[-1][:300]


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.cache
def device() -> torch.device:
    """The device this process trains on (see the module docstring); chosen once."""
    asked = os.environ.get("CARTLIB_DEVICE", "").strip().lower()
    if asked:
        if asked not in ("cpu", "cuda", "mps"):
            raise ValueError(f"CARTLIB_DEVICE={asked!r}: choose cpu, cuda or mps (or unset it)")
        available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": _mps_available()}
        if not available[asked]:
            raise ValueError(f"CARTLIB_DEVICE={asked} but torch finds no {asked} device here")
        return torch.device(asked)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        problem = probe("mps")
        if problem is None:
            return torch.device("mps")
        print(f"training on the CPU: Apple's mps lacks an operation cartlib uses ({problem})")
    return torch.device("cpu")


# ------------------------------------------------------------------------------- the precision
def resolve_precision(requested: str, dev: torch.device | str | None = None) -> tuple[str, str]:
    """(precision, why) for ``requested`` ("auto" or one of :data:`PRECISIONS`) on ``dev``
    (default: :func:`device`)."""
    if requested in PRECISIONS:
        return requested, "set explicitly"
    if requested != "auto":
        raise ValueError(f"mixed_precision={requested!r}: choose one of {', '.join(CHOICES)}")
    dev = torch.device(dev) if dev is not None else device()
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        name = torch.cuda.get_device_name(dev)
        if (major, minor) >= (8, 0):
            return "bf16", f"{name} (compute capability {major}.{minor}) runs bf16 natively"
        return "fp16", (
            f"{name} (compute capability {major}.{minor}) has no bf16: fp16 with a gradient scaler"
        )
    if dev.type == "cpu":
        native, why = cpu_bf16()
        return ("bf16" if native else "no"), why
    return "no", f"{dev.type} trains in fp32 (autocast on {dev.type} is not used by cartlib)"


@functools.cache
def auto_precision() -> tuple[str, str]:
    """``resolve_precision("auto")`` of this process, computed once."""
    return resolve_precision("auto")


def precision(requested: str) -> str:
    """The concrete precision of a ``mixed_precision`` setting."""
    return auto_precision()[0] if requested == "auto" else resolve_precision(requested)[0]


def describe(requested: str) -> str:
    """One line on the device and precision a run of ``mixed_precision=requested`` trains in."""
    dev = device()
    if requested == "auto":
        chosen, why = auto_precision()
        how = f"mixed_precision auto -> {chosen}: {why}"
    else:
        how = (
            f"mixed_precision {requested} (set explicitly; auto would choose {auto_precision()[0]})"
        )
    names = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    return f"training on {dev.type} in {names[precision(requested)]} ({how})"
