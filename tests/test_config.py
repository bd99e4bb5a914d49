"""Presets and the notebook-parameter validator: typos and wrong types are refused by name."""

import pytest

from cartlib import launch
from cartlib.config import ConfigError, available_presets, load_preset, save_config
from cartlib.params import notebook_config
from cartlib.series import notebook_parameters


def test_presets_load_and_inherit():
    assert {"smoke", "tiny", "cart-d16-256", "cart-d30-256", "var-d30-256"} <= set(
        available_presets()
    )
    tiny = load_preset("tiny")
    assert tiny.name == "tiny" and tiny.data.dataset == "fashion-mnist"
    d30 = load_preset("cart-d30-256")
    assert d30.ar.depth == 30 and d30.tokenizer.codebook_size == 4096
    assert d30.tokenizer.base_patch_nums[-1] == 16 and d30.decompose.order == 3
    assert load_preset("var-d30-256").decompose.order == 0


def test_unknown_names_and_wrong_types_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="did you mean 'depth'"):
        load_preset("smoke", ar={"dpeth": 3})
    with pytest.raises(ConfigError, match="must be a number"):
        load_preset("smoke", ar={"lr": "1e-3"})
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_preset("tinny")


def test_notebook_parameters_are_validated_like_papermill_cannot():
    ns = {"preset": "smoke", "order": 2, "alfa": 1.0}
    with pytest.raises(ConfigError, match="'alfa': did you mean 'alpha'"):
        notebook_config("01_mumford_shah_decomposition", ns)
    with pytest.raises(ConfigError, match="order='2' must be an integer"):
        notebook_config("01_mumford_shah_decomposition", {"order": "2"})
    params, cfg = notebook_config("04_train_ar", {"depth": 4, "steps": 7, "print": print})
    assert cfg.ar.depth == 4 and cfg.ar.steps == 7 and params.depth == 4
    assert cfg.tokenizer == load_preset("tiny").tokenizer  # nothing else changed (the default)


def test_series_parameters_are_strict_per_notebook():
    spec = {"common": {"preset": "tiny", "n_images": 3}, "04_train_ar": {"depht": 4}}
    assert notebook_parameters(spec, "05_sampling", {"preset", "seed"}) == {"preset": "tiny"}
    with pytest.raises(ConfigError, match="depht"):
        notebook_parameters(spec, "04_train_ar", {"preset", "depth"})


def test_depth_30_means_cart_d30_and_is_explained_without_gpus(tmp_path):
    params, cfg = notebook_config("04_train_ar", {"preset": "smoke", "depth": 30})
    assert params.preset == cfg.name == "cart-d30-256"
    plan = launch.plan_ar(cfg, tmp_path)
    assert 2.0e9 < plan.n_params < 2.05e9
    if plan.mode == "explain":  # this machine has no GPU
        text = " ".join(plan.problems)
        assert "GPU" in text and "data_root" in text
    assert "accelerate launch --multi_gpu --num_processes 16" in plan.command
    assert launch.plan_ar(load_preset("smoke"), tmp_path).mode == "in-process"


def test_every_notebook_mapping_names_its_own_parameters_and_real_settings():
    import dataclasses

    from cartlib.config import RunConfig
    from cartlib.params import NOTEBOOKS

    run = RunConfig()
    for name, (schema, mapping) in NOTEBOOKS.items():
        fields = {f.name for f in dataclasses.fields(schema)}
        assert set(mapping) <= fields, (name, set(mapping) - fields)
        assert "preset" in fields and "run_dir" in fields and "progress" in fields, name
        for target in mapping.values():
            obj = run
            for part in target.split("."):
                assert hasattr(obj, part), (name, target)
                obj = getattr(obj, part)


def test_series_passes_every_params_yaml_entry_to_a_declared_parameter():
    """Each named run's params.yaml only names parameters the notebooks declare."""
    import dataclasses
    from pathlib import Path

    import yaml

    from cartlib.params import NOTEBOOKS

    root = Path(__file__).resolve().parents[1] / "papermill_runs"
    for spec_path in root.glob("*/params.yaml"):
        spec = yaml.safe_load(spec_path.read_text())
        for name, (schema, _) in NOTEBOOKS.items():
            declared = {f.name for f in dataclasses.fields(schema)}
            params = notebook_parameters(spec, name, declared)
            notebook_config(name, params)  # validates names and types


def test_named_full_scale_runs_train_and_sample_one_model():
    """papermill_runs/cart-d16-256 and var-d16-256: notebook 05 opens the very tokenizer and
    transformer notebook 04 trains (the same artifact keys: data root, VAR's VQ-VAE given to
    both), with the paper's FID protocol switched on."""
    import dataclasses
    from pathlib import Path

    import yaml

    from cartlib.params import NOTEBOOKS

    root = Path(__file__).resolve().parents[1] / "papermill_runs"
    for preset in ("cart-d16-256", "var-d16-256"):
        spec = yaml.safe_load((root / preset / "params.yaml").read_text())
        assert spec["notebooks"] == ["04_train_ar", "05_sampling"]
        cfgs = {}
        for name in spec["notebooks"]:
            declared = {f.name for f in dataclasses.fields(NOTEBOOKS[name][0])}
            _, cfgs[name] = notebook_config(name, notebook_parameters(spec, name, declared))
        train, sample = cfgs["04_train_ar"], cfgs["05_sampling"]
        assert train.name == preset and train.data.root
        for stage in ("tokenizer", "ar"):
            assert train.artifact_key(stage) == sample.artifact_key(stage), (preset, stage)
        assert (sample.sample.guidance, sample.sample.top_k, sample.sample.top_p) == (
            1.5,
            900,
            0.96,
        )
        assert spec["05_sampling"]["adm_reference"] and spec["05_sampling"]["fid_per_class"] == 50
    var = yaml.safe_load((root / "var-d16-256" / "params.yaml").read_text())
    assert var["common"]["tokenizer_init_from"].endswith("vae_ch160v4096z32.pth")


def test_config_owns_its_derived_values_and_refuses_inconsistent_quantizer_order():
    cfg = load_preset("smoke")
    assert cfg.order == 3 and cfg.schedule().n_steps == 4 + 3
    assert cfg.ar.model_width == 64 * cfg.ar.depth and cfg.ar.model_heads == cfg.ar.depth
    assert load_preset("tiny").ar.model_width == 128
    var = cfg.var_baseline()
    assert var.order == 0 and var.tokenizer.quantizer == "multiscale"
    assert var.schedule().n_steps == len(cfg.tokenizer.base_patch_nums)
    assert cfg.with_order(2).schedule().n_factors == 2
    seeded = cfg.with_train_seed(3)
    assert (seeded.tokenizer.seed, seeded.ar.seed) == (3, 3) and seeded.order == cfg.order
    flat = cfg.with_flat_base()
    assert set(flat.tokenizer.base_patch_nums) == {cfg.tokenizer.base_patch_nums[-1]}
    with pytest.raises(ConfigError, match="quantizer='multiscale'.*order=3.*-p order 0"):
        load_preset("smoke", tokenizer={"quantizer": "multiscale"})
    with pytest.raises(ConfigError, match="order=0 has no details.*multiscale"):
        load_preset("smoke", decompose={"order": 0})
    with pytest.raises(ConfigError, match="vanilla"):
        cfg.updated(tokenizer={"quantizer": "vanilla"})
    assert cfg.with_quantizer("vanilla").order == 0
    # artifact keys: a setting the tokenizer does not depend on leaves its key alone
    assert cfg.digest(cfg.tokenizer_sections()) == cfg.updated(ar={"depth": 3}).digest(
        cfg.tokenizer_sections()
    )
    assert "decompose" not in var.tokenizer_sections()


def test_a_notebooks_order_alone_picks_the_tokenizer_that_goes_with_it():
    """`-p order 0` in 01/04 means VAR's multi-scale tokenizer (as cfg.with_order(0)), `-p order 2`
    the base-detail one; an explicit contradicting quantizer is still refused; 03 refuses 0."""
    from cartlib.params import notebook_config

    _, var = notebook_config("04_train_ar", {"order": 0})
    assert var.tokenizer.quantizer == "multiscale" and var.schedule().n_factors == 0
    _, cart = notebook_config("01_mumford_shah_decomposition", {"order": 2})
    assert cart.tokenizer.quantizer == "base_detail" and cart.order == 2
    with pytest.raises(ConfigError, match="order=0 has no details"):
        notebook_config("02_train_tokenizer", {"order": 0, "quantizer": "base_detail"})
    with pytest.raises(ConfigError, match="order=0 is out of range here"):
        notebook_config("03_tokenization", {"order": 0})
    with pytest.raises(ConfigError, match="scale=3 is out of range: choose 2, 4 or 8"):
        notebook_config("08_high_resolution_and_super_resolution", {"scale": 3})


def test_a_run_folders_config_yaml_is_a_preset(tmp_path):
    """`-p preset <run>/config.yaml` opens a run trained with settings no preset has: the same
    config (and so the same artifact keys) as the file, overrides on top; a missing file named."""
    cfg = load_preset("tiny", ar={"steps": 7}, data={"root": str(tmp_path)})
    save_config(cfg, tmp_path / "config.yaml")
    back = load_preset(str(tmp_path / "config.yaml"))
    assert back == cfg and back.stage_folder("ar") == cfg.stage_folder("ar")
    assert load_preset(str(tmp_path / "config.yaml"), ar={"depth": 3}).ar.depth == 3
    _, nb_cfg = notebook_config("05_sampling", {"preset": str(tmp_path / "config.yaml")})
    assert nb_cfg.ar.steps == 7
    with pytest.raises(ConfigError, match=r"no such settings file .*tiny"):
        load_preset(str(tmp_path / "missing.yaml"))
