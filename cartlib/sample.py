"""Generation with the next-detail transformer: KV cache, classifier-free guidance, top-k/top-p.

The loop runs the schedule step by step. At step m the transformer sees the embedded input of
step m (start token, or the accumulated f_hat resampled to step m's size) and the KV cache of all
earlier steps, predicts the h_m x w_m token map in parallel, samples it, and the tokenizer adds
phi_m(z_m) to f_hat (Alg. 2). Decoding f_hat after the base steps gives the generated base; after
each detail step, the image with that detail added (``return_steps=True``).

Classifier-free guidance runs the conditional and the null-class batch together:
``logits = (1 + t) * l_cond - t * l_null`` with t = ``cfg`` (``cfg_schedule="constant"``) or
VAR's linear ramp t = cfg * m / (M - 1) (``"linear"``).

Rejection sampling (the paper's and VAR's "-re" rows; neither says how, and VAR released no code
for it): ``rejection = r`` draws r candidates per requested image and keeps the one a scorer
ranks first — best-of-r, i.e. acceptance rate 1/r, as VQGAN, ViT-VQGAN and RQ-Transformer did
with an ImageNet classifier. ``scorer(images, labels) -> (B,)`` plugs in such a classifier (e.g.
the log-probability of the label under a ResNet); by default the transformer's own implicit
classifier ranks them: log p(r_1..r_M | c) - log p(r_1..r_M | null) summed over all tokens, which
is log p(c | x) - log p(c) by Bayes' rule, computed from the raw conditional and null-class
logits of the sampling pass itself (no extra forward, no external weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    images: torch.Tensor  # (B,3,H,W) in [0,1]
    tokens: list[torch.Tensor]  # r_1..r_M, each (B,h_k,w_k)
    steps: torch.Tensor | None  # (M,B,3,H,W) decoded after every step, if asked
    log_ratio: torch.Tensor | None = None  # (B,) log p(tokens | c) - log p(tokens | null)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the ``top_k`` largest logits and the smallest set with probability >= ``top_p``."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = drop.scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None) -> torch.Tensor:
    """Draw one token per position from (..., V) logits; temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def guidance(m: int, n_steps: int, cfg: float, schedule: str) -> float:
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return cfg * m / max(1, n_steps - 1)
    raise ValueError(f"cfg_schedule={schedule!r}: choose 'linear' (VAR) or 'constant'")


def _check_args(model, labels, cfg, top_k, top_p, temperature, rejection=1):
    nc = model.num_classes
    if labels.min() < 0 or labels.max() > nc:
        raise ValueError(
            f"labels must be in [0, {nc}] ({nc} = unconditional), got {labels.tolist()}"
        )
    if cfg < 0:
        raise ValueError(f"cfg={cfg} must be >= 0 (0 = no guidance)")
    if top_k < 0 or not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(
            f"top_k={top_k} must be >= 0, top_p={top_p} in (0, 1], temperature={temperature} >= 0"
        )
    if rejection < 1:
        raise ValueError(f"rejection={rejection} must be >= 1 (candidates per kept image)")


def _check_forced(sched, forced, forced_mask) -> None:
    if (forced is None) != (forced_mask is None):
        raise ValueError("pass forced and forced_mask together (token maps and where to keep them)")
    if forced is not None and not len(forced) == len(forced_mask) == sched.n_steps:
        raise ValueError(
            f"forced ({len(forced)}) and forced_mask ({len(forced_mask)}) need one map per step "
            f"of the schedule ({sched.n_steps}); use tokenizer.encode(images) for forced"
        )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    labels: torch.Tensor | list[int],
    cfg: float = 1.5,
    cfg_schedule: str = "linear",
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int | None = 0,
    return_steps: bool = False,
    prefix: list[torch.Tensor] | None = None,
    rejection: int = 1,
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    forced: list[torch.Tensor] | None = None,
    forced_mask: list[torch.Tensor] | None = None,
) -> Generation:
    """Class-conditional samples for ``labels`` (B,) (``model.num_classes`` = unconditional).

    ``prefix`` = given token maps r_1..r_k (e.g. a low-resolution image's base tokens for
    super-resolution): they are fed instead of sampled. ``forced`` = token maps r_1..r_M and
    ``forced_mask`` = bool maps (B,h_m,w_m): where the mask is True the token is forced to the
    given one at every step, elsewhere sampled (inpainting, :mod:`cartlib.apps.edit`).
    ``rejection`` > 1: best of that many
    candidates per image by ``scorer`` (default: the implicit classifier, see the module doc);
    the candidates are drawn as one batch of B x rejection. Same seed -> identical samples."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device).long()
    _check_args(model, labels, cfg, top_k, top_p, temperature, rejection)
    _check_forced(model.schedule, forced, forced_mask)
    kw = dict(cfg=cfg, cfg_schedule=cfg_schedule, top_k=top_k, top_p=top_p)
    kw.update(temperature=temperature, seed=seed, return_steps=return_steps)
    if rejection == 1:
        return _generate(model, tokenizer, labels, prefix, forced, forced_mask, null=False, **kw)
    b, r = len(labels), rejection
    many = labels.repeat_interleave(r)
    rep = lambda maps: (
        None if maps is None else [t.to(device).repeat_interleave(r, 0) for t in maps]
    )
    cand = _generate(
        model,
        tokenizer,
        many,
        rep(prefix),
        rep(forced),
        rep(forced_mask),
        null=scorer is None,
        **kw,
    )
    score = cand.log_ratio if scorer is None else scorer(cand.images, many).to(device)
    keep = score.view(b, r).argmax(1) + torch.arange(b, device=device) * r  # (B,)
    return Generation(
        cand.images[keep],
        [t[keep] for t in cand.tokens],
        None if cand.steps is None else cand.steps[:, keep],
        None if cand.log_ratio is None else cand.log_ratio[keep],
    )


def _generate(
    model, tokenizer, labels, prefix, forced, forced_mask, cfg, cfg_schedule, top_k, top_p,
    temperature, seed, return_steps, null: bool,
) -> Generation:  # fmt: skip
    """One sampling pass; ``null``: also run the null class without guidance (for log_ratio)."""
    device = labels.device
    model.eval()
    tokenizer.eval()
    q, sched = tokenizer.quantizer, model.schedule
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    b = len(labels)
    doubled = cfg > 0 or null  # conditional and null-class rows in one batch
    if doubled:
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    cond = model.class_emb(labels)
    caches = model.new_caches()
    f_hat, tokens, steps = None, [], []
    log_ratio = torch.zeros(b, device=device) if doubled else None
    x = model.step_tokens(0, cond, None)
    for m, step in enumerate(sched):
        logits = model.forward_step(x, cond, caches)  # (B or 2B, h_m w_m, V)
        raw = logits
        if doubled:
            t = guidance(m, sched.n_steps, cfg, cfg_schedule) if cfg > 0 else 0.0
            logits = (1 + t) * raw[:b] - t * raw[b:]
        if prefix is not None and m < len(prefix):
            idx = prefix[m].to(device).view(b, step.h, step.w)
        else:
            idx = sample_tokens(logits, temperature, top_k, top_p, gen).view(b, step.h, step.w)
        if forced is not None:  # inpainting: tokens outside the region are the given ones
            keep = forced_mask[m].to(device).view(b, step.h, step.w)
            idx = torch.where(keep, forced[m].to(device).view(b, step.h, step.w).long(), idx)
        if doubled:  # Bayes: log p(c | x) - log p(c), summed over this step's tokens
            picked = idx.flatten(1).repeat(2, 1)[..., None]  # (2B, h_m w_m, 1)
            lp = raw.float().log_softmax(-1).gather(-1, picked)
            log_ratio += (lp[:b] - lp[b:]).sum((1, 2))
        tokens.append(idx)
        f_hat = q.add_term(f_hat, idx, m)
        if return_steps:
            steps.append(tokenizer.decode(f_hat))
        if m + 1 < sched.n_steps:
            inp = q.next_input(f_hat, m + 1)
            x = model.step_tokens(m + 1, cond, torch.cat([inp, inp]) if doubled else inp)
    return Generation(
        tokenizer.decode(f_hat), tokens, torch.stack(steps) if return_steps else None, log_ratio
    )


@torch.no_grad()
def sample_set(
    model, tokenizer, n: int, seed: int = 0, batch_size: int = 100, **kw
) -> torch.Tensor:
    """``n`` class-balanced samples (labels 0, 1, ..., repeating) for FID/KID, in batches.
    Deterministic in ``seed``; ``kw`` go to :func:`generate`. -> (n, 3, H, W) on the CPU"""
    labels = torch.arange(n) % model.num_classes
    out = []
    for i in range(0, n, batch_size):
        gen = generate(model, tokenizer, labels[i : i + batch_size], seed=seed * 100_003 + i, **kw)
        out.append(gen.images.cpu())
    return torch.cat(out)
