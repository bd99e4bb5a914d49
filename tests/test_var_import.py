"""VAR's released transformer checkpoints load into NextDetailTransformer and give VAR's logits.

The checkpoints here are random tensors with the names and shapes of VAR's model definition (its
public models/var.py and basic_var.py: VAR, AdaLNSelfAttn, SelfAttention, FFN, AdaLNBeforeHead),
at depth 2 (width 128, 2 heads: VAR's 64 x depth rule), VAR's 256 px schedule 1..16, vocabulary
4096, Cvae 32. ``var_logits`` is VAR's teacher-forced forward written out in plain torch on those
names, independently of cartlib's modules (but from the same reading of VAR's source as the
converter: tests/test_var_golden.py compares with outputs of VAR's own code)."""

import math

import pytest
import torch

from cartlib import stages
from cartlib.config import load_preset
from cartlib.interop.var import install_var_run
from cartlib.model import build_model
from cartlib.model.var_import import load_var_transformer, var_layout, var_state_dict_to_cartlib
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.var_layout import var_state_dict

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEPTH, CLASSES, CVAE, VOCAB = 2, 10, 32, 4096
WIDTH, HEADS = 64 * DEPTH, DEPTH


def var_levels(patch_nums) -> torch.Tensor:
    """(L,) the scale index of every token, as VAR's ``lvl_1L``."""
    return torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])


def var_checkpoint(
    l2_norm=True, shared=False, depth=DEPTH, patch_nums=PATCH_NUMS, vocab=VOCAB, cvae=CVAE, seed=0
) -> dict[str, torch.Tensor]:
    """A random state dict in VAR's layout: VAR(depth, embed_dim=64 depth, num_heads=depth,
    mlp_ratio=4, attn_l2_norm, shared_aln, patch_nums) on a VQ-VAE of ``vocab`` codes of
    ``cvae`` channels."""
    g = torch.Generator().manual_seed(seed)
    c, heads, hidden = 64 * depth, depth, 4 * 64 * depth

    def rand(*shape, std=0.1):
        fan_in = shape[-1] if len(shape) == 2 else 0
        return torch.randn(shape, generator=g) * (fan_in**-0.5 if fan_in else std)

    lvl = var_levels(patch_nums)
    sd = {
        "class_emb.weight": rand(CLASSES + 1, c, std=1.0),
        "pos_start": rand(1, patch_nums[0] ** 2, c, std=0.5),
        "pos_1LC": rand(1, len(lvl), c, std=0.5),
        "lvl_embed.weight": rand(len(patch_nums), c, std=0.5),
        "word_embed.weight": rand(c, cvae),
        "word_embed.bias": rand(c),
        "lvl_1L": lvl[None],
        "attn_bias_for_masking": torch.where(lvl[:, None] >= lvl[None], 0.0, -torch.inf)[
            None, None
        ],
        "head_nm.ada_lin.1.weight": rand(2 * c, c),
        "head_nm.ada_lin.1.bias": rand(2 * c),
        "head.weight": rand(vocab, c),
        "head.bias": rand(vocab),
    }
    if shared:
        sd["shared_ada_lin.1.weight"], sd["shared_ada_lin.1.bias"] = rand(6 * c, c), rand(6 * c)
    for i in range(depth):
        p = f"blocks.{i}."
        if shared:
            sd[p + "ada_gss"] = rand(1, 1, 6, c)
        else:
            sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"] = rand(6 * c, c), rand(6 * c)
        if l2_norm:  # log scales around log 4; the last head above the cap log 100
            scale = torch.full((1, heads, 1, 1), math.log(4.0)) + rand(1, heads, 1, 1, std=0.5)
            scale[0, -1] = 5.0
            sd[p + "attn.scale_mul_1H11"] = scale
        sd |= {
            p + "attn.mat_qkv.weight": rand(3 * c, c),
            p + "attn.q_bias": rand(c),
            p + "attn.v_bias": rand(c),
            p + "attn.zero_k_bias": torch.zeros(c),
            p + "attn.proj.weight": rand(c, c),
            p + "attn.proj.bias": rand(c),
            p + "ffn.fc1.weight": rand(hidden, c),
            p + "ffn.fc1.bias": rand(hidden),
            p + "ffn.fc2.weight": rand(c, hidden),
            p + "ffn.fc2.bias": rand(c),
        }
    return sd


# ------------------------------------------------------------------ VAR's forward, by hand
def linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def layer_norm(x, eps=1e-6):  # VAR: LayerNorm(eps=1e-6, elementwise_affine=False)
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / ((x - mu).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def gelu_tanh(x):  # VAR's FFN: GELU(approximate="tanh")
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x * torch.sigmoid(x)


def var_attention(x, sd, p, heads, bias):
    """VAR's SelfAttention: mat_qkv without bias + (q_bias, 0, v_bias); L2-normalised q, k with
    q x exp(min(scale_mul, log 100)) and softmax scale 1, else scale 0.25 / sqrt(head dim)."""
    b, n, c = x.shape
    qkv_bias = torch.cat([sd[p + "q_bias"], sd[p + "zero_k_bias"], sd[p + "v_bias"]])
    qkv = (x @ sd[p + "mat_qkv.weight"].T + qkv_bias).view(b, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, n, c/H) each
    if p + "scale_mul_1H11" in sd:
        q = (
            q
            / q.norm(dim=-1, keepdim=True)
            * sd[p + "scale_mul_1H11"].clamp(max=math.log(100)).exp()
        )
        k = k / k.norm(dim=-1, keepdim=True)
        scale = 1.0
    else:
        scale = 0.25 / math.sqrt(c // heads)
    attn = (q @ k.transpose(-1, -2) * scale + bias).softmax(-1)
    return linear((attn @ v).transpose(1, 2).reshape(b, n, c), sd, p + "proj")


def var_logits(sd, labels, x_wo_first, patch_nums=PATCH_NUMS):
    """VAR.forward(label_B, x_BLCv_wo_first_l) with cond_drop_rate 0: logits (B, L, V)."""
    c = sd["class_emb.weight"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = c // 64
    b, first = len(labels), patch_nums[0] ** 2
    cond = sd["class_emb.weight"][labels]  # (B, C)
    sos = cond[:, None].expand(b, first, c) + sd["pos_start"]
    x = torch.cat([sos, linear(x_wo_first, sd, "word_embed")], 1)
    lvl = var_levels(patch_nums)
    x = x + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"]
    bias = torch.where(lvl[:, None] >= lvl[None], 0.0, -torch.inf)  # block-causal
    shared = "shared_ada_lin.1.weight" in sd
    gss = linear(silu(cond), sd, "shared_ada_lin.1").view(b, 1, 6, c) if shared else None
    for i in range(depth):
        p = f"blocks.{i}."
        if shared:
            ada = sd[p + "ada_gss"] + gss
        else:
            ada = linear(silu(cond), sd, p + "ada_lin.1").view(b, 1, 6, c)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = layer_norm(x) * (1 + scale1) + shift1
        x = x + var_attention(h, sd, p + "attn.", heads, bias) * gamma1
        h = layer_norm(x) * (1 + scale2) + shift2
        x = x + linear(gelu_tanh(linear(h, sd, p + "ffn.fc1")), sd, p + "ffn.fc2") * gamma2
    scale, shift = linear(silu(cond), sd, "head_nm.ada_lin.1").view(b, 1, 2, c).unbind(2)
    return linear(layer_norm(x) * (1 + scale) + shift, sd, "head")


# ------------------------------------------------------------------ cartlib's side
def cartlib_model(l2_norm=True, shared=False, depth=DEPTH, **tokenizer):
    """cartlib's transformer of the var-d16-256 preset at ``depth`` (VAR's schedule)."""
    cfg = load_preset(
        "var-d16-256",
        ar={"depth": depth, "attn_l2_norm": l2_norm, "shared_adaln": shared},
        tokenizer=tokenizer,
    )
    return build_model(cfg, cfg.schedule(), CLASSES).eval()


def test_preset_schedule_is_vars():
    model = cartlib_model()
    assert tuple(s.h for s in model.schedule) == PATCH_NUMS
    assert tuple(s.w for s in model.schedule) == PATCH_NUMS
    assert (model.width, model.blocks[0].attn.heads) == (WIDTH, HEADS)


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_presets_take_the_released_checkpoints(depth):
    """The var-d*-256 presets ask for the layout of VAR's var_d<depth>.pth (built on the meta
    device: no memory)."""
    cfg = load_preset(f"var-d{depth}-256")
    layout = var_layout(build_model(cfg, cfg.schedule(), 1000, device="meta"))
    c, last = 64 * depth, f"blocks.{depth - 1}."
    assert layout["class_emb.weight"] == (1001, c)
    assert layout["pos_1LC"] == (1, 680, c) and layout["lvl_embed.weight"] == (10, c)
    assert layout["word_embed.weight"] == (c, 32) and layout["head.weight"] == (4096, c)
    assert layout[last + "attn.scale_mul_1H11"] == (1, depth, 1, 1)
    assert layout[last + "ffn.fc1.weight"] == (4 * c, c)
    assert layout[last + "ada_lin.1.weight"] == (6 * c, c)
    assert f"blocks.{depth}.attn.q_bias" not in layout and "shared_ada_lin.1.weight" not in layout


@pytest.mark.parametrize(
    "l2_norm,shared",
    [(True, False), (False, False), (True, True)],
    ids=["released-d16-d30", "plain-attention", "shared-adaln-d36"],
)
def test_imported_logits_equal_vars(l2_norm, shared):
    sd = var_checkpoint(l2_norm, shared)
    model = load_var_transformer(cartlib_model(l2_norm, shared), sd)
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([3, CLASSES])  # a class and the null class
    x = torch.randn(2, model.schedule.seq_len - 1, CVAE, generator=g)
    with torch.no_grad():
        ours, theirs = model(labels, x), var_logits(sd, labels, x)
    assert ours.shape == (2, 680, VOCAB)
    assert theirs.std() > 0.5  # a non-trivial function of the weights
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_loads_from_file_and_training_checkpoint(tmp_path):
    sd = var_checkpoint()
    torch.save(sd, tmp_path / "var_d2.pth")
    a = load_var_transformer(cartlib_model(), tmp_path / "var_d2.pth")
    b = load_var_transformer(cartlib_model(), {"trainer": {"var_wo_ddp": sd}})
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_adaln_chunks_are_permuted():
    """cartlib's (shift1, scale1, gate1, shift2, scale2, gate2) from VAR's (gate1, gate2, scale1,
    scale2, shift1, shift2); the head's (shift, scale) from VAR's (scale, shift)."""
    sd = var_checkpoint()
    ours = var_state_dict_to_cartlib(sd)
    var_chunks = sd["blocks.0.ada_lin.1.bias"].view(6, WIDTH)
    our_chunks = ours["blocks.0.ada.1.bias"].view(6, WIDTH)
    for j, name in enumerate(["shift1", "scale1", "gamma1", "shift2", "scale2", "gamma2"]):
        i = ["gamma1", "gamma2", "scale1", "scale2", "shift1", "shift2"].index(name)
        assert torch.equal(our_chunks[j], var_chunks[i]), name
    head = sd["head_nm.ada_lin.1.bias"].view(2, WIDTH)
    assert torch.equal(ours["head_ada.1.bias"].view(2, WIDTH), head.flip(0))


def _error(sd, model=None) -> str:
    with pytest.raises(ValueError) as e:
        load_var_transformer(model or cartlib_model(), sd)
    return str(e.value)


def test_missing_key_is_named():
    sd = var_checkpoint()
    del sd["blocks.1.attn.q_bias"]
    assert "'blocks.1.attn.q_bias' is missing" in _error(sd)


def test_extra_key_is_named():
    sd = var_checkpoint()
    sd["blocks.0.attn.k_bias"] = torch.zeros(WIDTH)
    msg = _error(sd)
    assert "'blocks.0.attn.k_bias' is in the checkpoint but not in the model" in msg
    assert "var_d*.pth" in msg


def test_wrong_shape_is_named():
    sd = var_checkpoint()
    sd["head.weight"] = sd["head.weight"][:1000]
    msg = _error(sd)
    assert "'head.weight' has shape (1000, 128)" in msg and "(4096, 128)" in msg
    assert "codebook_size" in msg


def test_other_depth_schedule_or_attention_is_explained():
    assert "ar.depth (the checkpoint has 3 blocks, the model 2)" in _error(var_checkpoint(depth=3))
    short = var_checkpoint(patch_nums=PATCH_NUMS[:4])
    assert "token schedule" in _error(short)
    assert "ar.attn_l2_norm" in _error(var_checkpoint(l2_norm=False))
    assert "ar.shared_adaln" in _error(var_checkpoint(shared=True))


def test_buffers_are_checked():
    sd = var_checkpoint()
    sd["attn_bias_for_masking"] = torch.zeros_like(sd["attn_bias_for_masking"])  # not causal
    assert "'attn_bias_for_masking' does not match" in _error(sd)
    sd = var_checkpoint()
    sd["blocks.0.attn.zero_k_bias"] = torch.ones(WIDTH)
    assert "zero_k_bias is not zero" in _error(sd)


def test_cached_steps_equal_vars():
    """The sampling path (start token, then one step at a time with the KV cache) on imported
    weights gives VAR's teacher-forced logits step by step."""
    sd = var_checkpoint()
    model = load_var_transformer(cartlib_model(), sd)
    labels = torch.tensor([7])
    x = torch.randn(1, model.schedule.seq_len - 1, CVAE, generator=torch.Generator().manual_seed(2))
    cond, caches, first = model.class_emb(labels), model.new_caches(), PATCH_NUMS[0] ** 2
    with torch.no_grad():
        steps = []
        for m in range(model.schedule.n_steps):
            sl = model.schedule.step_slice(m)
            inputs = None if m == 0 else x[:, sl.start - first : sl.stop - first]
            steps.append(model.forward_step(model.step_tokens(m, cond, inputs), cond, caches))
        theirs = var_logits(sd, labels, x)
    torch.testing.assert_close(torch.cat(steps, 1), theirs, atol=1e-5, rtol=1e-5)


# a VAR-architecture VQ-VAE small enough for CPU: 8 px images, 4x4 latents, scales 1..4
SMALL_VAE = {"arch": "var", "channels": 32, "ch_mult": (1, 2), "latent_channels": 4,
             "codebook_size": 16, "base_patch_nums": (1, 2, 3, 4), "phi_share": 4}  # fmt: skip


def test_installed_run_is_what_the_stages_load_and_sample(tmp_path):
    """VAR's two checkpoints installed into a run directory: the CLI's stages load them as the
    finished tokenizer and transformer (the same logits as VAR's) and sample from them."""
    cfg = load_preset("var-d16-256", data={"resolution": 8}, tokenizer=SMALL_VAE, ar={"depth": 1})
    vae = var_state_dict(Tokenizer(cfg.tokenizer, cfg.decompose, 8))
    sd = var_checkpoint(depth=1, patch_nums=(1, 2, 3, 4), vocab=16, cvae=4)
    install_var_run(cfg, tmp_path, vae, sd, num_classes=CLASSES)
    tok = stages.trained("tokenizer", cfg, tmp_path)
    model = stages.trained("ar", cfg, tmp_path, tok)
    labels = torch.arange(CLASSES + 1)
    x = torch.randn(CLASSES + 1, 29, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(labels, x), var_logits(sd, labels, x, (1, 2, 3, 4))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    folder = stages.sample_images(cfg, tmp_path, per_class=1, batch=CLASSES, progress=False)
    assert len(list((folder / "png").glob("*.png"))) == CLASSES


def test_import_var_command_installs_a_run_that_samples(tmp_path, capsys):
    """``python -m cartlib import-var``: VAR's two files into a run directory, then the printed
    ``sample`` stage runs on it; a file of another depth fails by name, rc 1."""
    from cartlib.__main__ import main
    from cartlib.config import save_config

    cfg = load_preset("var-d16-256", data={"resolution": 8}, tokenizer=SMALL_VAE, ar={"depth": 1})
    save_config(cfg, tmp_path / "var.yaml")
    torch.save(var_state_dict(Tokenizer(cfg.tokenizer, cfg.decompose, 8)), tmp_path / "vae.pth")
    sd = var_checkpoint(depth=1, patch_nums=(1, 2, 3, 4), vocab=16, cvae=4)
    torch.save(sd, tmp_path / "var_d1.pth")
    files = ["--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "var_d1.pth")]
    run = ["--config", str(tmp_path / "var.yaml"), "--run-dir", str(tmp_path / "run")]
    assert main(["import-var", *run, *files, "--num-classes", str(CLASSES)]) == 0
    assert "cartlib sample --config" in capsys.readouterr().out
    config = str(tmp_path / "run" / "config.yaml")
    sample = ["sample", "--config", config, "--run-dir", str(tmp_path / "run"), "--per-class", "1"]
    assert main([*sample, "--batch", str(CLASSES)]) == 0
    assert len(list((tmp_path / "run").rglob("png/*.png"))) == CLASSES
    torch.save(var_checkpoint(depth=2, patch_nums=(1, 2, 3, 4), vocab=16, cvae=4), tmp_path / "d2")
    bad = ["--vae", str(tmp_path / "vae.pth"), "--var", str(tmp_path / "d2")]
    assert main(["import-var", *run[:2], "--run-dir", str(tmp_path / "other"), *bad]) == 1
    assert "depth" in capsys.readouterr().err
