"""Device and precision chosen by the hardware (cartlib.hardware): every branch of the rule with
the capability mocked, ``auto`` through the config, the accelerator, the launcher and the
notebooks, and finished models opening at whatever precision they were trained in."""

import os
import re
import subprocess
import sys

import pytest
import torch

from cartlib import cluster, hardware, runs, shipped, train
from cartlib.__main__ import main as cli
from cartlib.config import ConfigError, load_preset
from cartlib.params import notebook_config
from cartlib.train.checkpoints import installed_from
from cartlib.train.probe import run_probe

NATIVE = {"avx512_bf16": True, "amx": False, "capability": "AVX512", "onednn_isa": None}


@pytest.fixture
def fresh(monkeypatch):
    """hardware's memoized choices forgotten before and after the test."""
    hardware.device.cache_clear()
    hardware.auto_precision.cache_clear()
    monkeypatch.delenv("CARTLIB_DEVICE", raising=False)
    yield monkeypatch
    hardware.device.cache_clear()
    hardware.auto_precision.cache_clear()


def cpu_without_bf16(monkeypatch):
    """This process resolves ``auto`` as an AVX2-only CPU does (fp32)."""
    monkeypatch.setattr(hardware, "cpu_bf16", lambda facts=None: (False, "mocked: AVX2 only"))
    hardware.auto_precision.cache_clear()


# ------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    "facts, native, why",
    [
        (NATIVE, True, "natively.*avx512_bf16"),
        ({**NATIVE, "avx512_bf16": False, "amx": True}, True, "natively.*amx"),
        ({**NATIVE, "avx512_bf16": False, "capability": "AVX2"}, False, "no avx512_bf16 or AMX"),
        ({**NATIVE, "capability": "AVX2"}, False, "ATEN_CPU_CAPABILITY"),
        ({**NATIVE, "onednn_isa": "AVX2"}, False, "ONEDNN_MAX_CPU_ISA=AVX2"),
        ({**NATIVE, "onednn_isa": "AVX512_CORE"}, False, "ONEDNN_MAX_CPU_ISA"),
        ({**NATIVE, "onednn_isa": "AVX512_CORE_BF16"}, True, "natively"),
        ({**NATIVE, "onednn_isa": "AVX512_CORE_AMX", "amx": True}, True, "natively"),
    ],
)
def test_cpu_bf16_is_native_only_with_the_instructions_and_kernels(facts, native, why):
    got, reason = hardware.cpu_bf16(facts)
    assert got is native
    assert re.search(why, reason), reason


def test_cpu_facts_read_this_machine():
    facts = hardware.cpu_facts()
    assert facts["capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(facts["avx512_bf16"], bool) and isinstance(facts["amx"], bool)


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_a_cpu_follows_native_bf16(fresh, native):
    fresh.setattr(hardware, "cpu_bf16", lambda facts=None: (native, "mocked"))
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if native else "no", "mocked")


@pytest.mark.parametrize("cc, want", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                      ((7, 0), "fp16"), ((6, 1), "fp16")])  # fmt: skip
def test_auto_on_a_cuda_gpu_follows_compute_capability(fresh, cc, want):
    fresh.setattr(torch.cuda, "get_device_capability", lambda dev=None: cc)
    fresh.setattr(torch.cuda, "get_device_name", lambda dev=None: "Mocked GPU")
    chosen, why = hardware.resolve_precision("auto", "cuda")
    assert chosen == want and f"{cc[0]}.{cc[1]}" in why
    assert ("gradient scaler" in why) == (want == "fp16")


def test_auto_on_mps_is_fp32_and_explicit_settings_win(fresh):
    assert hardware.resolve_precision("auto", "mps")[0] == "no"
    fresh.setattr(hardware, "cpu_bf16", lambda facts=None: (False, "mocked"))
    for p in hardware.PRECISIONS:
        assert hardware.resolve_precision(p, "cpu") == (p, "set explicitly")
        assert hardware.precision(p) == p
    with pytest.raises(ValueError, match="mixed_precision='fp32'.*auto, no, bf16, fp16"):
        hardware.resolve_precision("fp32", "cpu")


def test_describe_says_device_precision_and_why(fresh):
    cpu_without_bf16(fresh)
    line = hardware.describe("auto")
    assert line.startswith("training on cpu in fp32") and "auto -> no: mocked: AVX2 only" in line
    assert "bf16 autocast" in hardware.describe("bf16") and "auto would choose no" in (
        hardware.describe("bf16")
    )


# ---------------------------------------------------------------------------------- the device
def test_device_is_cuda_then_probed_mps_then_cpu(fresh, capsys):
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    fresh.setattr(hardware, "_mps_available", lambda: True)
    fresh.setattr(hardware, "probe", lambda dev: None)
    assert hardware.device() == torch.device("mps")
    hardware.device.cache_clear()
    fresh.setattr(hardware, "probe", lambda dev: "NotImplementedError: aten::op on mps")
    assert hardware.device() == torch.device("cpu")
    assert "mps lacks an operation cartlib uses (NotImplementedError" in capsys.readouterr().out
    hardware.device.cache_clear()
    fresh.setattr(torch.cuda, "is_available", lambda: True)
    assert hardware.device() == torch.device("cuda")


def test_device_by_hand(fresh):
    fresh.setenv("CARTLIB_DEVICE", "cpu")
    assert hardware.device() == torch.device("cpu")
    hardware.device.cache_clear()
    fresh.setenv("CARTLIB_DEVICE", "gpu")
    with pytest.raises(ValueError, match="CARTLIB_DEVICE='gpu': choose cpu, cuda or mps"):
        hardware.device()
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    fresh.setenv("CARTLIB_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no cuda device here"):
        hardware.device()


def test_probe_runs_the_training_ops_and_reports_a_missing_one(monkeypatch):
    assert hardware.probe("cpu") is None  # the real thing, in a fresh process
    failed = subprocess.CompletedProcess([], 1, "loading\nNotImplementedError: aten::op", "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    assert hardware.probe("mps") == "NotImplementedError: aten::op"  # its last line
    monkeypatch.undo()

    def missing(*args, **kwargs):
        raise NotImplementedError("The operator 'aten::upsample_bicubic2d' is not implemented")

    monkeypatch.setattr(torch.nn.functional, "interpolate", missing)
    with pytest.raises(NotImplementedError, match="upsample_bicubic2d"):
        run_probe("cpu")
    assert cli(["probe-device", "cpu"]) == 1


# ---------------------------------------------------------------------------- auto in the code
def test_auto_keys_as_what_it_resolves_to(fresh):
    cfg = load_preset("tiny")
    assert cfg.mixed_precision == "auto"
    for native, p in ((True, "bf16"), (False, "no")):
        fresh.setattr(hardware, "cpu_bf16", lambda facts=None, n=native: (n, "mocked"))
        hardware.auto_precision.cache_clear()
        assert cfg.precision == p and cfg.resolved().mixed_precision == p
        for stage in ("tokenizer", "ar"):
            assert cfg.artifact_key(stage) == cfg.updated(mixed_precision=p).artifact_key(stage)
    assert load_preset("cart-d16-256").mixed_precision == "bf16"  # full scale: explicit
    with pytest.raises(ConfigError, match="'auto', 'no', 'bf16', 'fp16'"):
        load_preset("smoke", mixed_precision="fp32")


def test_accelerator_and_launcher_take_auto(fresh):
    cpu_without_bf16(fresh)
    assert train.make_accelerator("auto").mixed_precision == "no"
    fresh.setattr(hardware, "cpu_bf16", lambda facts=None: (True, "mocked"))
    hardware.auto_precision.cache_clear()
    assert train.make_accelerator("auto").mixed_precision == "bf16"
    args = cluster.launch_args(cluster.Cluster(2), "train-ar", "c.yaml", "run", "auto")
    assert "--mixed_precision" not in args  # each launched process resolves it on its device
    assert "bf16" in cluster.launch_args(cluster.Cluster(2), "train-ar", "c.yaml", "run", "bf16")


def test_a_notebook_prints_its_precision_and_gets_it_resolved(fresh, capsys):
    cpu_without_bf16(fresh)
    # 02 trains when told to (its default opens the shipped tokenizer and says nothing of it)
    params, cfg = notebook_config("02_train_tokenizer", {"retrain": True})
    assert cfg.mixed_precision == "no"
    assert "training on cpu in fp32 (mixed_precision auto -> no" in capsys.readouterr().out
    _, cfg = notebook_config("02_train_tokenizer", {"retrain": True, "mixed_precision": "bf16"})
    assert cfg.mixed_precision == "bf16"
    assert "mixed_precision bf16 (set explicitly" in capsys.readouterr().out


def test_a_stage_folder_records_the_precision_it_trained_in(fresh, tmp_path):
    from test_train import tiny_cfg, tiny_data

    cpu_without_bf16(fresh)
    cfg = tiny_cfg(steps=1, ckpt_every=1)
    assert cfg.mixed_precision == "auto"
    train.train_tokenizer(cfg, tmp_path, progress=False, data=tiny_data())
    saved = (train.tokenizer_dir(tmp_path, cfg) / "config.yaml").read_text()
    assert "mixed_precision: 'no'" in saved or "mixed_precision: no" in saved


# ------------------------------------------------------------- finished models at any precision
NOTEBOOK_STAGES = {  # what notebooks 03, 05, 06, 07 open at their committed defaults
    "03_tokenization": lambda cfg, p: [("tokenizer", c) for c in cfg.tokenizer_variants().values()],
    "05_sampling": lambda cfg, p: [("ar", cfg)],
    "06_ablation_decomposition_order": lambda cfg, p: [
        ("ar", cfg.with_order(n).with_train_seed(s)) for n in p.orders for s in p.train_seeds
    ],
    "07_attention_maps": lambda cfg, p: [("ar", cfg), ("ar", cfg.var_baseline())],
}


def _no_training(*args, **kwargs):
    raise AssertionError("trained, though cartlib ships this model")


@pytest.mark.parametrize("notebook", list(NOTEBOOK_STAGES))
def test_notebooks_open_the_shipped_models_on_an_fp32_machine(fresh, tmp_path, notebook):
    cpu_without_bf16(fresh)
    fresh.setattr(train, "train_tokenizer", _no_training)
    fresh.setattr(train, "train_ar", _no_training)
    params, cfg = notebook_config(notebook, {})
    assert cfg.mixed_precision == "no" and params.retrain is False
    for stage, c in NOTEBOOK_STAGES[notebook](cfg, params):
        assert shipped.find(stage, c) is None  # nothing ships at fp32: found at bf16 instead
        if stage == "tokenizer":
            runs.ensure_tokenizer(c, tmp_path, progress=False, shipped=True)
        else:
            tok, model = runs.ensure_ar(c, tmp_path, progress=False, shipped=True)
            bf16 = c.updated(mixed_precision="bf16")
            assert installed_from(train.ar_dir(tmp_path, bf16)) is not None
            assert not train.ar_dir(tmp_path, c).exists()  # nothing made at fp32


@pytest.mark.parametrize("native_bf16", [False, True])
def test_notebook_09_opens_its_shipped_factor_carts_on_either_cpu_kind(
    fresh, tmp_path, native_bf16
):
    """09's intrinsic and specular CARTs ship trained in fp32 (on an AVX2 CPU): an AVX2 CPU opens
    them as they are, a bf16-native one through the other-precision fallback; neither trains."""
    from cartlib.apps.edit import factor_configs

    fresh.setattr(hardware, "cpu_bf16", lambda facts=None: (native_bf16, "mocked"))
    hardware.auto_precision.cache_clear()
    fresh.setattr(train, "train_tokenizer", _no_training)
    fresh.setattr(train, "train_ar", _no_training)
    params, cfg = notebook_config("09_recolour_relight_inpaint", {})
    assert cfg.mixed_precision == ("bf16" if native_bf16 else "no")
    cfg = cfg.updated(data={"dataset": params.dataset})  # as 09's set-up cell does
    made = factor_configs(cfg, params.shading_steps, params.specular_order, params.lighting_depth)
    for c in made.values():
        runs.ensure_ar(c, tmp_path, progress=False, shipped=True)
        fp32 = c.updated(mixed_precision="no")
        assert shipped.find("ar", fp32) is not None
        assert installed_from(train.ar_dir(tmp_path, fp32)) is not None


def test_training_anew_keys_by_this_machines_precision(fresh, tmp_path):
    """-p retrain True (shipped=False) trains at fp32 beside an installed bf16 model; the run
    directory's own finished model wins over the shipped one at another precision."""
    from test_train import tiny_cfg, tiny_data

    cpu_without_bf16(fresh)
    cfg = tiny_cfg(steps=2, ckpt_every=1)
    bf16 = cfg.updated(mixed_precision="bf16")
    data = tiny_data()
    trained_bf16, _ = train.train_tokenizer(bf16, tmp_path, progress=False, data=data)
    got = runs.ensure_tokenizer(cfg, tmp_path, progress=False)  # fp32 here: opens the bf16 one
    assert all(torch.equal(v, trained_bf16.state_dict()[k]) for k, v in got.state_dict().items())
    assert runs.settle("tokenizer", cfg, tmp_path) == bf16
    assert runs.settle("tokenizer", cfg, tmp_path, shipped=False) == cfg.resolved()
    # a partial run at this machine's precision is resumed, not passed over for the bf16 one
    train.train_tokenizer(cfg, tmp_path, progress=False, data=data, stop_after=1)
    assert runs.settle("tokenizer", cfg, tmp_path) == cfg.resolved()
    assert train.tokenizer_dir(tmp_path, cfg) != train.tokenizer_dir(tmp_path, bf16)


def test_the_avx2_simulation_of_make_test_avx2_takes_effect():
    """`make test-avx2` caps torch's and oneDNN's kernels at AVX2: auto must then be fp32."""
    code = (
        "from cartlib import hardware; "
        "print(hardware.cpu_facts()['capability'], hardware.auto_precision()[0])"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    env.pop("CARTLIB_DEVICE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "no"]


def test_an_unquoted_yaml_no_is_refused_with_the_fix(tmp_path):
    from cartlib.config import load_config

    (tmp_path / "c.yaml").write_text("mixed_precision: no\n")  # YAML 1.1: the boolean false
    with pytest.raises(ConfigError, match=r"unquoted no.*quote it, e.g. mixed_precision: \"no\""):
        load_config(tmp_path / "c.yaml")
