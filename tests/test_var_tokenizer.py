"""VAR's VQ-VAE (arch "var"): the state dict has exactly the keys and shapes of VAR's model
definition (its public models/vqvae.py, basic_vae.py, quant.py), so vae_ch160v4096z32.pth loads
into the order-0 multi-scale tokenizer, and loaded weights tokenize as VAR's quantizer does."""

import pytest
import torch
import torch.nn.functional as F

from cartlib.config import DecomposeConfig, TokenizerConfig, load_preset
from cartlib.tokenizer import Tokenizer
from cartlib.tokenizer.var_layout import load_var_state_dict, var_state_dict


def var_vqvae_shapes(ch, ch_mult, z, vocab, share, n_scales, n_res=2) -> dict[str, tuple]:
    """Parameter/buffer names and shapes of VAR's VQVAE(ch, z_channels=z, vocab_size=vocab,
    share_quant_resi=share, v_patch_nums of n_scales), written out from its module structure:
    Encoder(conv_in, down[i].block[j] / .attn[j] at the last level / .downsample.conv, mid,
    norm_out, conv_out), Decoder(conv_in, mid, up[i] with n_res + 1 blocks, upsample.conv,
    norm_out, conv_out), quant_conv, post_quant_conv, VectorQuantizer2(embedding, quant_resi,
    ema_vocab_hit_SV)."""
    out: dict[str, tuple] = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        conv(f"{name}.qkv", c, 3 * c, 1)
        conv(f"{name}.proj_out", c, c, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        attn(f"{prefix}.mid.attn_1", c)
        resnet(f"{prefix}.mid.block_2", c, c)

    last = len(ch_mult) - 1
    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for i, m in enumerate(ch_mult):
        for j in range(n_res):
            resnet(f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if i == last:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i != last:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c)
    conv("encoder.conv_out", c, z, 3)
    c = ch * ch_mult[-1]
    conv("decoder.conv_in", z, c, 3)
    mid("decoder", c)
    for i in reversed(range(len(ch_mult))):
        for j in range(n_res + 1):
            resnet(f"decoder.up.{i}.block.{j}", c, ch * ch_mult[i])
            c = ch * ch_mult[i]
            if i == last:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)
    conv("quant_conv", z, z, 3)
    conv("post_quant_conv", z, z, 3)
    out["quantize.embedding.weight"] = (vocab, z)
    for k in range(share):
        conv(f"quantize.quant_resi.qresi_ls.{k}", z, z, 3)
    out["quantize.ema_vocab_hit_SV"] = (n_scales, vocab)
    return out


def test_var_preset_tokenizer_has_exactly_vars_keys_and_shapes():
    cfg = load_preset("var-d16-256")
    t = cfg.tokenizer
    assert (t.arch, t.channels, t.ch_mult, t.latent_channels) == ("var", 160, (1, 1, 2, 2, 4), 32)
    assert (t.codebook_size, t.phi_share, cfg.order) == (4096, 4, 0)
    with torch.device("meta"):
        tok = Tokenizer(t, cfg.decompose, cfg.data.resolution)
    ours = {k: tuple(v.shape) for k, v in var_state_dict(tok).items()}
    want = var_vqvae_shapes(160, (1, 1, 2, 2, 4), 32, 4096, 4, 10)
    assert sorted(set(ours) - set(want)) == [] and sorted(set(want) - set(ours)) == []
    assert ours == want
    # encoder, decoder and the quant convs carry VAR's names verbatim in our own state dict
    plain = {k for k in tok.state_dict() if not k.startswith("quantizer.")}
    assert plain == {k for k in want if not k.startswith("quantize.")}
    n = sum(p.numel() for p in tok.parameters())
    assert abs(n - 109e6) / 109e6 < 0.005, n  # VAR's VQ-VAE: 109M parameters


def test_cart_presets_use_vars_architecture_with_one_phi_per_step():
    cfg = load_preset("cart-d30-256")
    assert cfg.tokenizer.arch == "var" and cfg.tokenizer.phi_share == 0
    with torch.device("meta"):
        tok = Tokenizer(cfg.tokenizer, cfg.decompose, 256)
    assert len(tok.quantizer.phis) == cfg.schedule().n_steps == 14


SMALL = {"arch": "var", "channels": 32, "ch_mult": (1, 2), "latent_channels": 4,
         "codebook_size": 16, "base_patch_nums": (1, 2, 3, 4), "phi_share": 4,
         "quantizer": "multiscale"}  # fmt: skip


def small_var_state(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = var_vqvae_shapes(32, (1, 2), 4, 16, 4, 4)
    return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}


def naive_var_tokens(state, images, scales=(1, 2, 3, 4)) -> list[torch.Tensor]:
    """VAR's multi-scale quantization (quant.py's f_to_idxBl_or_fhat) written out with the
    loaded tensors: area down, nearest code, bicubic up, phi from 4 shared convs by tick."""
    tok = Tokenizer(TokenizerConfig(**SMALL), DecomposeConfig(order=0), 8)
    load_var_state_dict(tok, state)
    f = F.conv2d(
        tok.encoder(images), state["quant_conv.weight"], state["quant_conv.bias"], padding=1
    )
    emb, rest, out = state["quantize.embedding.weight"], f.clone(), []
    ticks = torch.tensor([1 / 12, 1 / 3 + 1 / 36, 2 / 3 - 1 / 36, 11 / 12])  # linspace(1/12, 11/12)
    for si, pn in enumerate(scales):
        z = F.interpolate(rest, size=(pn, pn), mode="area") if pn != 4 else rest
        flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
        idx = torch.cdist(flat, emb).argmin(1).view(len(images), pn, pn)
        h = emb[idx].permute(0, 3, 1, 2)
        h = F.interpolate(h, size=(4, 4), mode="bicubic") if pn != 4 else h
        k = int((ticks - si / 3).abs().argmin())
        w, b = (state[f"quantize.quant_resi.qresi_ls.{k}.{p}"] for p in ("weight", "bias"))
        rest = rest - (0.5 * h + 0.5 * F.conv2d(h, w, b, padding=1))
        out.append(idx)
    return out


def test_vars_state_dict_loads_strictly_and_tokenizes_as_vars_quantizer():
    state = small_var_state()
    tok = Tokenizer(TokenizerConfig(**SMALL), DecomposeConfig(order=0), 8).eval()
    load_var_state_dict(tok, state)
    back = var_state_dict(tok)
    assert set(back) == set(state)
    for k, v in state.items():
        if k != "quantize.ema_vocab_hit_SV":  # VAR's code-use statistics are not kept
            assert torch.equal(back[k], v), k
    assert bool(tok.quantizer.initialized)  # no re-initialisation from a first batch
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = tok.encode(x)
    want = naive_var_tokens(state, x)
    assert all(torch.equal(a, b) for a, b in zip(ours, want))
    f_hat = tok.features(ours)
    assert tok.decode(f_hat).shape == (3, 3, 8, 8)


def test_loading_refuses_the_wrong_tokenizer_and_says_what_to_set():
    state = small_var_state()
    other = Tokenizer(TokenizerConfig(**{**SMALL, "phi_share": 0}), DecomposeConfig(order=0), 8)
    with pytest.raises(ValueError, match="phi_share=4"):
        load_var_state_dict(other, state)
    cart = Tokenizer(
        TokenizerConfig(**{**SMALL, "quantizer": "base_detail"}), DecomposeConfig(order=1), 8
    )
    with pytest.raises(ValueError, match="order-0"):
        load_var_state_dict(cart, state)
    broken = {k: v for k, v in state.items() if k != "decoder.conv_out.bias"}
    tok = Tokenizer(TokenizerConfig(**SMALL), DecomposeConfig(order=0), 8)
    with pytest.raises(RuntimeError, match="decoder.conv_out.bias"):
        load_var_state_dict(tok, broken)


def test_var_arch_needs_group_norm_friendly_channels():
    with pytest.raises(ValueError, match="multiple of 32"):
        Tokenizer(TokenizerConfig(**{**SMALL, "channels": 24}), DecomposeConfig(order=0), 8)


def test_init_from_installs_vars_weights_as_the_finished_tokenizer(tmp_path, capsys):
    """``tokenizer.init_from``: VAR's VQ-VAE file becomes the run's finished tokenizer, strictly
    loaded, nothing trained; the folder is keyed by it; a missing file or a CART tokenizer is
    refused with what to do."""
    from cartlib import runs, stages, train

    path = tmp_path / "vae_ch160v4096z32.pth"
    state = small_var_state(seed=3)
    torch.save(state, path)
    cfg = load_preset(
        "smoke", data={"resolution": 8}, decompose={"order": 0}, mixed_precision="no",
        tokenizer={**SMALL, "init_from": str(path), "steps": 50},
    )  # fmt: skip
    tok = runs.ensure_tokenizer(cfg, tmp_path / "run", progress=False)
    assert "installed from" in capsys.readouterr().out
    assert all(torch.equal(var_state_dict(tok)[k], state[k]) for k in state if "ema" not in k)
    folder = train.tokenizer_dir(tmp_path / "run", cfg)
    trained = cfg.updated(tokenizer={"init_from": None})
    assert folder != train.tokenizer_dir(tmp_path / "run", trained)  # keyed by init_from
    again = stages.trained("tokenizer", cfg, tmp_path / "run")  # finished: loaded, not installed
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 tok.state_dict().values()))  # fmt: skip
    assert "installed from" not in capsys.readouterr().out
    missing = cfg.updated(tokenizer={"init_from": str(tmp_path / "nowhere.pth")})
    with pytest.raises(FileNotFoundError, match="does not exist: give the path of VAR's"):
        runs.ensure_tokenizer(missing, tmp_path / "run2", progress=False)
    cart = cfg.updated(tokenizer={"quantizer": "base_detail"}, decompose={"order": 1})
    with pytest.raises(ValueError, match="order-0"):
        runs.ensure_tokenizer(cart, tmp_path / "run3", progress=False)
