"""VAR's released transformers (``var_d16.pth`` ... ``var_d30.pth``, ``var_d36.pth``) in cartlib.

VAR (Tian et al. 2024, github.com/FoundationVision/VAR, ``models/var.py``, ``basic_var.py``)
and :class:`~cartlib.model.transformer.NextDetailTransformer` compute the same function; the
parameters are named, split and ordered differently. With C the width, H the heads, L the
sequence length, M the number of steps, V the vocabulary, N the classes, F the MLP width:

    VAR                                  shape          cartlib
    class_emb.weight                     (N+1, C)       class_emb.weight
    pos_start                            (1, h1 w1, C)  pos_start
    pos_1LC                              (1, L, C)      pos_emb
    lvl_embed.weight                     (M, C)         lvl_emb.weight
    word_embed.{weight,bias}             (C, Cvae)      word_embed.{weight,bias}
    lvl_1L                               (1, L)         -  checked == schedule.level_ids()
    attn_bias_for_masking                (1, 1, L, L)   -  checked == 0 / -inf of attn_mask()
    shared_ada_lin.1.{weight,bias}       (6C, C)        shared_ada.1.{weight,bias}  [rows P6]
    blocks.i.ada_lin.1.{weight,bias}     (6C, C)        blocks.i.ada.1.{weight,bias}  [rows P6]
    blocks.i.ada_gss                     (1, 1, 6, C)   blocks.i.ada_gss (1, 6C)  [P6]
    blocks.i.attn.mat_qkv.weight         (3C, C)        blocks.i.attn.qkv.weight  [q rows x a]
    blocks.i.attn.q_bias, v_bias         (C,)           blocks.i.attn.qkv.bias =
    blocks.i.attn.zero_k_bias            (C,)             (a q_bias, 0, v_bias); k: checked 0
    blocks.i.attn.scale_mul_1H11         (1, H, 1, 1)   blocks.i.attn.scale_mul
    blocks.i.attn.proj.{weight,bias}     (C, C)         blocks.i.attn.proj.{weight,bias}
    blocks.i.ffn.fc1.{weight,bias}       (F, C)         blocks.i.mlp.0.{weight,bias}
    blocks.i.ffn.fc2.{weight,bias}       (C, F)         blocks.i.mlp.2.{weight,bias}
    head_nm.ada_lin.1.{weight,bias}      (2C, C)        head_ada.1.{weight,bias}  [halves swapped]
    head.{weight,bias}                   (V, C)         head.{weight,bias}

* P6, the adaLN chunks: VAR splits its 6C modulation as (gate1, gate2, scale1, scale2, shift1,
  shift2), :meth:`Block.modulation` as (shift1, scale1, gate1, shift2, scale2, gate2) — 1 =
  attention, 2 = MLP. cartlib's chunk j is VAR's chunk ``ADALN_FROM_VAR[j]`` = (4, 2, 0, 5, 3, 1).
  The head's 2C are (scale, shift) in VAR and (shift, scale) in cartlib.
* a, the attention scale: with ``attn_l2_norm`` (every released d16-d30 model) both normalise q
  and k, multiply q by exp(min(s_h, log 100)) and use softmax scale 1, so a = 1. Without it VAR
  scales the logits by 0.25 / sqrt(head dim), cartlib by 1 / sqrt(head dim): the query rows of
  the weight and the query bias are multiplied by a = 0.25, which gives the same logits.
* VAR has no key bias (``zero_k_bias`` is a zero buffer); cartlib's key third of ``qkv.bias`` is
  set to 0 (with ``attn_l2_norm`` cartlib also masks it out).

Conventions that already agree (so nothing else is converted): LayerNorm eps 1e-6 without affine
parameters, GELU with the tanh approximation, the block-causal mask (a token sees every token of
its own and earlier steps), the first step's tokens = class embedding + ``pos_start``, every
token + its position and level embedding, the head's adaLN on the class embedding (not the
shared projection), the null class at index N. VAR's ``forward`` drops labels with probability
``cond_drop_rate`` even in eval mode; cartlib does that in its training loop, so cartlib's
``forward`` equals VAR's with ``cond_drop_rate = 0``.

Usage (VAR-d16 at 256 px: the ``var-d16-256`` preset has VAR's width, heads, schedule and
attention; ``cartlib.tokenizer.var_layout`` loads the VQ-VAE ``vae_ch160v4096z32.pth``)::

    cfg = load_preset("var-d16-256")
    model = build_model(cfg, cfg.schedule(), num_classes=1000)
    load_var_transformer(model, "var_d16.pth")

To install VAR's two files into a run directory, where the CLI's stages find them, see
:func:`cartlib.interop.var.install_var_run` (``python -m cartlib import-var``,
``docs/var-import.md``); it is there, not here, because it writes the training layer's folders.
"""

from __future__ import annotations

import os
import re

import torch

from cartlib.model.transformer import NextDetailTransformer
from cartlib.trust import load_torch

ADALN_FROM_VAR = (4, 2, 0, 5, 3, 1)  # cartlib's adaLN chunk j is VAR's chunk ADALN_FROM_VAR[j]
HEAD_FROM_VAR = (1, 0)  # cartlib's head (shift, scale) from VAR's (scale, shift)
VAR_PLAIN_ATTN_SCALE = 0.25  # VAR's softmax scale without attn_l2_norm, times 1 / sqrt(head dim)

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_RENAME = {
    "pos_1LC": "pos_emb",
    "lvl_embed.weight": "lvl_emb.weight",
    "attn.scale_mul_1H11": "attn.scale_mul",
    "ffn.fc1.weight": "mlp.0.weight",
    "ffn.fc1.bias": "mlp.0.bias",
    "ffn.fc2.weight": "mlp.2.weight",
    "ffn.fc2.bias": "mlp.2.bias",
}
_DROPPED = ("lvl_1L", "attn_bias_for_masking")  # buffers, checked against the schedule


def _chunks(t: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """``t`` with its first dimension cut into len(order) equal chunks, put in ``order``."""
    return t.reshape(len(order), -1, *t.shape[1:])[list(order)].reshape(t.shape)


def _plain_attention(sd: dict) -> bool:
    return not any(k.endswith("attn.scale_mul_1H11") for k in sd)


def _block_to_cartlib(i: int, name: str, sd: dict, plain: bool) -> dict[str, torch.Tensor]:
    """cartlib's entries of block ``i`` from VAR's entry ``name`` of that block."""
    p, v = f"blocks.{i}.", sd[f"blocks.{i}.{name}"]
    if name in ("ada_lin.1.weight", "ada_lin.1.bias"):
        return {p + "ada.1." + name.rsplit(".", 1)[1]: _chunks(v, ADALN_FROM_VAR)}
    if name == "ada_gss":  # (1, 1, 6, C) -> (1, 6 C)
        return {p + "ada_gss": _chunks(v.reshape(6, -1), ADALN_FROM_VAR).reshape(1, -1)}
    a = VAR_PLAIN_ATTN_SCALE if plain else 1.0
    if name == "attn.mat_qkv.weight":
        w = v.clone()
        w[: len(w) // 3] *= a
        return {p + "attn.qkv.weight": w}
    if name == "attn.q_bias":
        k = sd.get(p + "attn.zero_k_bias", torch.zeros_like(v))
        if k.count_nonzero():
            raise ValueError(f"{p}attn.zero_k_bias is not zero: VAR has no key bias")
        return {p + "attn.qkv.bias": torch.cat([a * v, torch.zeros_like(v), sd[p + "attn.v_bias"]])}
    if name in ("attn.v_bias", "attn.zero_k_bias"):  # in attn.qkv.bias (see q_bias)
        return {}
    return {p + _RENAME.get(name, name): v}


def var_state_dict_to_cartlib(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VAR's transformer state dict -> :class:`NextDetailTransformer`'s (see the module doc).
    VAR's buffers ``lvl_1L`` and ``attn_bias_for_masking`` are dropped (:func:`load_var_transformer`
    checks them against the model's schedule); keys it does not know pass through unchanged, so
    that a strict load names them."""
    plain = _plain_attention(sd)
    out = {}
    for key, v in sd.items():
        block = _BLOCK.fullmatch(key)
        if block:
            out.update(_block_to_cartlib(int(block[1]), block[2], sd, plain))
        elif key in ("shared_ada_lin.1.weight", "shared_ada_lin.1.bias"):
            out["shared_ada." + key.split(".", 1)[1]] = _chunks(v, ADALN_FROM_VAR)
        elif key in ("head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias"):
            out["head_ada.1." + key.rsplit(".", 1)[1]] = _chunks(v, HEAD_FROM_VAR)
        elif key not in _DROPPED:
            out[_RENAME.get(key, key)] = v
    return out


def var_layout(model: NextDetailTransformer) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the VAR checkpoint that fits ``model``."""
    c, L = model.width, model.schedule.seq_len
    blk = model.blocks[0]
    hidden, heads, latent = blk.mlp[0].out_features, blk.attn.heads, model.word_embed.in_features
    shapes = {
        "class_emb.weight": (model.num_classes + 1, c),
        "pos_start": tuple(model.pos_start.shape),
        "pos_1LC": (1, L, c),
        "lvl_embed.weight": (model.schedule.n_steps, c),
        "word_embed.weight": (c, latent),
        "word_embed.bias": (c,),
        "lvl_1L": (1, L),
        "attn_bias_for_masking": (1, 1, L, L),
        "head_nm.ada_lin.1.weight": (2 * c, c),
        "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (model.head.out_features, c),
        "head.bias": (model.head.out_features,),
    }
    if model.shared_ada is not None:
        shapes |= {"shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,)}
    for i in range(model.depth):
        p = f"blocks.{i}."
        if model.shared_ada is not None:
            shapes[p + "ada_gss"] = (1, 1, 6, c)
        else:
            shapes |= {p + "ada_lin.1.weight": (6 * c, c), p + "ada_lin.1.bias": (6 * c,)}
        if blk.attn.l2_norm:
            shapes[p + "attn.scale_mul_1H11"] = (1, heads, 1, 1)
        shapes |= {
            p + "attn.mat_qkv.weight": (3 * c, c),
            p + "attn.q_bias": (c,),
            p + "attn.v_bias": (c,),
            p + "attn.zero_k_bias": (c,),
            p + "attn.proj.weight": (c, c),
            p + "attn.proj.bias": (c,),
            p + "ffn.fc1.weight": (hidden, c),
            p + "ffn.fc1.bias": (hidden,),
            p + "ffn.fc2.weight": (c, hidden),
            p + "ffn.fc2.bias": (c,),
        }
    return shapes


def _hint(key: str, model: NextDetailTransformer, ckpt_depth: int) -> str:
    """The setting that decides the checkpoint entry ``key`` (of a checkpoint with
    ``ckpt_depth`` blocks)."""
    attn = model.blocks[0].attn
    block = _BLOCK.fullmatch(key)
    if block and ckpt_depth != model.depth:
        return f"ar.depth (the checkpoint has {ckpt_depth} blocks, the model {model.depth})"
    if key.startswith(("pos_", "lvl_", "attn_bias_for_masking")):
        steps = ",".join(f"{s.h}x{s.w}" for s in model.schedule)
        return f"the token schedule (the model's: {steps}; VAR 256 px: 1,2,3,4,5,6,8,10,13,16)"
    if key.startswith("class_emb"):
        return f"the number of classes (the model has {model.num_classes}; VAR: 1000)"
    if key.startswith("head."):
        return f"tokenizer.codebook_size (the model's vocabulary: {model.head.out_features})"
    if key.startswith("word_embed"):
        return f"tokenizer.latent_channels (the model's: {model.word_embed.in_features})"
    if "scale_mul" in key:
        return f"ar.attn_l2_norm (the model's: {attn.l2_norm}) and ar.heads ({attn.heads})"
    if "ada_gss" in key or "shared_ada_lin" in key or (block and "ada_lin" in key):
        return f"ar.shared_adaln (the model's: {model.shared_ada is not None}; VAR-d36 uses it)"
    if key in var_layout(model):
        return f"ar.width and ar.mlp_ratio (the model: width {model.width}, VAR's 64 x depth)"
    return "that the file is VAR's transformer (var_d*.pth), not its VQ-VAE or another model"


def check_var_layout(model: NextDetailTransformer, sd: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first key of VAR's checkpoint ``sd`` that is missing,
    unexpected or of the wrong shape for ``model``, and the setting to check; and when VAR's
    buffers disagree with the model's schedule."""
    want = var_layout(model)
    problems = (
        [(k, "is missing from the checkpoint") for k in want if k not in sd]
        + [(k, "is in the checkpoint but not in the model") for k in sd if k not in want]
        + [
            (k, f"has shape {tuple(sd[k].shape)} in the checkpoint, the model needs {want[k]}")
            for k in want
            if k in sd and tuple(sd[k].shape) != want[k]
        ]
    )
    if problems:
        ckpt_depth = len({m[1] for k in sd if (m := _BLOCK.fullmatch(k))})
        key, what = problems[0]
        more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
        hint = _hint(key, model, ckpt_depth)
        raise ValueError(f"VAR checkpoint: {key!r} {what}{more}: check {hint}")
    mask = model.schedule.attn_mask()[None, None]  # (1, 1, L, L) True = may attend
    for key, ok in (
        ("lvl_1L", torch.equal(sd["lvl_1L"].flatten().long().cpu(), model.schedule.level_ids())),
        ("attn_bias_for_masking", torch.equal(sd["attn_bias_for_masking"].cpu() == 0, mask)),
    ):
        if not ok:
            raise ValueError(
                f"VAR checkpoint: {key!r} does not match the model's schedule: check "
                + _hint(key, model, model.depth)
            )


def _read(path_or_sd: dict | str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict: given, or read from VAR's ``.pth`` (a plain tensor dict: no pickled code
    is run). A dict nested as VAR's training checkpoints are (``ckpt["trainer"]["var_wo_ddp"]``)
    is unwrapped; those files hold pickled objects beyond tensors, which cartlib refuses to
    load (:mod:`cartlib.trust`): take the state dict out in a session that trusts the file and
    pass the dict."""
    # tensors only: no code from the file is run
    sd = path_or_sd if isinstance(path_or_sd, dict) else load_torch(path_or_sd)
    return sd.get("trainer", {}).get("var_wo_ddp", sd)


def load_var_transformer(
    model: NextDetailTransformer, path_or_state_dict: dict | str | os.PathLike
) -> NextDetailTransformer:
    """Load VAR's transformer weights (a state dict or the ``.pth`` file) into ``model``
    strictly: every key, shape and buffer is checked first (:func:`check_var_layout`)."""
    sd = _read(path_or_state_dict)
    check_var_layout(model, sd)
    model.load_state_dict(var_state_dict_to_cartlib(sd), strict=True)
    return model
