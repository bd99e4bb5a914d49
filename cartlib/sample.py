"""Generation with the next-detail transformer: KV cache, classifier-free guidance, top-k/top-p.

The loop runs the schedule step by step. At step m the transformer sees the embedded input of
step m (start token, or the accumulated f_hat resampled to step m's size) and the KV cache of all
earlier steps, predicts the h_m x w_m token map in parallel, samples it, and the tokenizer adds
phi_m(z_m) to f_hat (Alg. 2). Decoding f_hat after the base steps gives the generated base; after
each detail step, the image with that detail added (``return_steps=True``).

Classifier-free guidance runs the conditional and the null-class batch together:
``logits = (1 + t) * l_cond - t * l_null`` with t = ``cfg`` (``cfg_schedule="constant"``) or
VAR's linear ramp t = cfg * m / (M - 1) (``"linear"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    images: torch.Tensor  # (B,3,H,W) in [0,1]
    tokens: list[torch.Tensor]  # r_1..r_M, each (B,h_k,w_k)
    steps: torch.Tensor | None  # (M,B,3,H,W) decoded after every step, if asked


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


def _check_args(model, labels, cfg, top_k, top_p, temperature):
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
    forced: list[torch.Tensor] | None = None,
    forced_mask: list[torch.Tensor] | None = None,
) -> Generation:
    """Class-conditional samples for ``labels`` (B,) (``model.num_classes`` = unconditional).

    ``prefix`` = given token maps r_1..r_k (e.g. a low-resolution image's base tokens for
    super-resolution): they are fed instead of sampled. ``forced`` = token maps r_1..r_M and
    ``forced_mask`` = bool maps (B,h_m,w_m): where the mask is True the token is forced to the
    given one at every step, elsewhere sampled (inpainting, :mod:`cartlib.apps.edit`). Same seed
    -> identical samples."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, device=device).long()
    _check_args(model, labels, cfg, top_k, top_p, temperature)
    _check_forced(model.schedule, forced, forced_mask)
    model.eval()
    tokenizer.eval()
    q, sched = tokenizer.quantizer, model.schedule
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    b = len(labels)
    use_cfg = cfg > 0
    if use_cfg:
        labels = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    cond = model.class_emb(labels)
    caches = model.new_caches()
    f_hat, tokens, steps = None, [], []
    x = model.step_tokens(0, cond, None)
    for m, step in enumerate(sched):
        logits = model.forward_step(x, cond, caches)  # (B or 2B, h_m w_m, V)
        if use_cfg:
            t = guidance(m, sched.n_steps, cfg, cfg_schedule)
            logits = (1 + t) * logits[:b] - t * logits[b:]
        if prefix is not None and m < len(prefix):
            idx = prefix[m].to(device).view(b, step.h, step.w)
        else:
            idx = sample_tokens(logits, temperature, top_k, top_p, gen).view(b, step.h, step.w)
        if forced is not None:
            keep = forced_mask[m].to(device).view(b, step.h, step.w)
            idx = torch.where(keep, forced[m].to(device).view(b, step.h, step.w).long(), idx)
        tokens.append(idx)
        f_hat = q.add_term(f_hat, idx, m)
        if return_steps:
            steps.append(tokenizer.decode(f_hat))
        if m + 1 < sched.n_steps:
            inp = q.next_input(f_hat, m + 1)
            x = model.step_tokens(m + 1, cond, torch.cat([inp, inp]) if use_cfg else inp)
    return Generation(tokenizer.decode(f_hat), tokens, torch.stack(steps) if return_steps else None)


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
