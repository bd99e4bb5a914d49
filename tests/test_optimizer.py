"""The transformer's optimizer: VAR's weight-decay groups, learning-rate and weight-decay
schedules, and that train_ar applies them."""

import math

import pytest
import torch

from cartlib import train
from cartlib.config import load_preset
from cartlib.io import load_checkpoint
from cartlib.model import build_model
from cartlib.tokenizer import Tokenizer
from cartlib.train.loop import build_optimizer, lr_lambda, weight_decay_at


def groups_of(preset: str) -> dict[str, set[str]]:
    cfg = load_preset(preset)
    model = build_model(cfg, cfg.schedule(), 1000, device="meta")
    opt = build_optimizer(model, 1e-4, 0.05)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    n_params = sum(1 for _ in model.parameters())
    assert len(decayed["params"]) + len(exempt["params"]) == n_params
    return {"decay": set(decayed["names"]), "exempt": set(exempt["names"])}


@pytest.mark.parametrize("preset", ["cart-d16-256", "var-d36-s-512"])
def test_position_start_level_embeddings_biases_and_scales_get_no_weight_decay(preset):
    g = groups_of(preset)
    for name in ("pos_start", "pos_emb", "lvl_emb.weight"):  # VAR's nowd_keys
        assert name in g["exempt"], name
    assert all(not n.endswith("bias") for n in g["decay"])
    assert {n for n in g["exempt"] if "scale_mul" in n or "ada_gss" in n}  # attention/adaLN
    # VAR decays the class and word embeddings and every weight matrix
    assert {"class_emb.weight", "word_embed.weight", "head.weight"} <= g["decay"]
    assert all(n in g["decay"] for n in g["decay"] | g["exempt"] if n.endswith("qkv.weight"))


def test_unnamed_parameters_keep_the_ndim_rule():
    lin = torch.nn.Linear(3, 4)
    decayed, exempt = build_optimizer(lin.parameters(), 1e-3, 0.1).param_groups
    assert [p.shape for p in decayed["params"]] == [(4, 3)]
    assert [p.shape for p in exempt["params"]] == [(4,)]


def test_lin0_schedule_is_vars_warmup_flat_then_linear_to_the_end_ratio():
    f = lr_lambda(warmup=10, total=110, final=0.01, schedule="lin0")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == 1.0 and f(14) == 1.0  # flat for 5% of the 100 post-warm-up steps
    assert f(109) == pytest.approx(0.01)  # the last step reaches VAR's wpe
    mid = [f(s) for s in range(20, 110)]
    assert all(a > b for a, b in zip(mid, mid[1:]))  # then linear, strictly falling
    steps = [b - a for a, b in zip(mid, mid[1:])]
    assert max(steps) - min(steps) < 1e-9
    cos = lr_lambda(warmup=10, total=110, final=0.1)
    assert cos(110) == pytest.approx(0.1) and cos(60) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_lambda(10, 110, schedule="step")


def test_weight_decay_schedule_is_cosine_from_start_to_end():
    assert weight_decay_at(0, 101, 0.05, 0.08) == pytest.approx(0.05)
    assert weight_decay_at(50, 101, 0.05, 0.08) == pytest.approx(0.065)
    assert weight_decay_at(100, 101, 0.05, 0.08) == pytest.approx(0.08)
    assert weight_decay_at(70, 101, 0.05, None) == 0.05


def test_train_ar_applies_the_lr_and_weight_decay_schedules(tmp_path):
    cfg = load_preset(
        "smoke",
        data={"resolution": 8},
        decompose={"order": 1},
        tokenizer={"channels": 8, "ch_mult": [1, 2], "latent_channels": 4, "codebook_size": 16,
                   "base_patch_nums": [1, 2, 4]},
        ar={"depth": 1, "width": 32, "heads": 2, "steps": 6, "batch_size": 4, "warmup": 2,
            "lr_schedule": "lin0", "lr_end": 0.01, "weight_decay": 0.05,
            "weight_decay_end": 0.2, "ckpt_every": 6},
    )  # fmt: skip
    tok = Tokenizer(cfg.tokenizer, cfg.decompose, 8)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randint(16, (8, s.h, s.w), generator=g) for s in tok.schedule]
    train.train_ar(cfg, tmp_path, tok, tokens, torch.arange(8) % 3, 3, progress=False)
    (path,) = tmp_path.glob("ar-*/last.pt")
    decayed, exempt = load_checkpoint(path)["optimizers"]["opt"]["param_groups"]
    assert decayed["weight_decay"] == pytest.approx(0.2)  # the last step's value
    assert exempt["weight_decay"] == 0.0
    assert "pos_emb" in exempt["names"] and "class_emb.weight" in decayed["names"]
    lr = cfg.ar.lr * cfg.ar.batch_size / 256
    assert decayed["lr"] == pytest.approx(lr * lr_lambda(2, 6, 0.01, "lin0")(6))
    assert not math.isclose(decayed["lr"], lr * lr_lambda(2, 6)(6))  # not the cosine one
