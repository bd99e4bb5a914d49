"""Ambrosio-Tortorelli minimisation of the Mumford-Shah functional (Eq. 4), batched in torch.

    E(u, s) = sum |u - f|^2 + alpha sum (1 - s)^2 |grad u|^2
              + lam sum (eps |grad s|^2 + s^2 / (4 eps))                            (Eq. 4)

f and u are (B, C, H, W) images, s is ONE edge map (B, 1, H, W) shared by the colour channels:
``|u - f|^2`` and ``|grad u|^2`` are summed over channels (the vector norms of Eq. 4), so a colour
edge is an edge of all channels at once. As in the paper, s ~ 1 on edges, s ~ 0 in smooth parts.

Design decisions (measured with the scripts in benchmarks/ and tests/test_decompose.py):

- **Pixel units**: the sums run over pixels, grid spacing 1, forward differences, Neumann
  boundary (zero gradient across the last row/column). With the paper's alpha = 1, lam = 0.01
  this is a nearly convex problem (alternation started from s = 0 or from the edges of f reaches
  the same energy to 5 digits on photos), each level smooths texture over a few pixels while
  contrast edges stay sharp, and B_1, B_2, B_3 get progressively smoother with details of
  similar size, as the paper describes (Table 5: beyond order 3 the base is over-smoothed).
  The alternative, a unit domain (spacing 1/N: alpha_pixel = alpha N^2, lam_pixel = lam N),
  turns one AT step into a posterised cartoon and then B_2 ~ B_3 ~ B_1 (D_2, D_3 ~ 0, a degenerate
  hierarchy); its alternation from s = 0 falls into the trivial minimum u = mean(f), s = 0; and
  its systems have condition numbers ~8 alpha N^2 (5e5 at 256 px) instead of <= 9.
- **eps = DEFAULT_EPS = 0.1 pixel.** Pointwise s = a / (a + lam / (4 eps)) with a = alpha
  |grad u|^2, so s = 1/2 where |grad u| = sqrt(lam / (4 eps alpha)) = 0.16 per pixel at eps = 0.1
  (above the gradients of sigma = 0.05 noise). Too large and s ~ 1 everywhere: measured on
  scikit-image photos at 32/128/256 px, the share of pixels with s > 1/2 after one level is
  18/10/6% at eps = 0.1, 45/28/19% at 0.5 and 62/42/31% at 1.0, where B_3 stays within 40-47 dB
  PSNR of the image (nothing visibly smoothed). At eps = 0.1, B_3 has 55-61% of the image's total
  variation (Fashion-MNIST: 82%) at 29-32 dB, with object edges sharp. On a noisy step (tests:
  height 0.6, sigma 0.05) one level removes 2/3 of the flat-region noise and keeps the whole step
  in one pixel; quadratic smoothing with equal noise removal keeps 48% of it (order 3: 87% noise
  removed, 100% vs 22%). eps = 0.25 already lets noise form edges (mean s in flat parts 0.23).
  With eps below a pixel the eps |grad s|^2 term only joins neighbouring edge pixels: edge maps
  are one or two pixels wide.
- **u-step**: Jacobi-preconditioned conjugate gradient, matrix-free (slicing stencils, no
  convolutions), batched over images and channels (every (image, channel) slice has its own step
  sizes: B*C independent CG runs), warm-started from the previous u, on
  (I + alpha D^T diag((1-s)^2) D) u = f.
- **s-step: exact** (PCG on the s-subproblem, which is also quadratic):
  (alpha g + lam/(4 eps)) s + lam eps D^T D s = alpha g,  g = sum_c |grad u_c|^2,
  warm-started from the previous s. The closed form that drops the grad-s term, s = alpha g /
  (alpha g + lam/(4 eps)), minimises a different function and can raise E; the exact step keeps
  E monotone. s in [0, 1]: the matrix is an M-matrix (positive diagonal, non-positive
  off-diagonal, diagonally dominant), so its inverse is entrywise >= 0 and alpha g >= 0 gives
  s >= 0; for t = 1 - s the same matrix has right side lam/(4 eps) > 0 (as D^T D 1 = 0), so s < 1.
  An early-stopped CG iterate may leave [0, 1] slightly; it is clipped, which never raises E
  (each term of E(s) is non-increasing under clipping and clipping is 1-Lipschitz for grad s).
- **Energy never increases**: a CG iterate minimises the quadratic over x_0 + Krylov space, so
  along x_0 + t d (d the CG step) the quadratic is symmetric about t = 1 and any over-relaxation
  t = ``relax`` in (0, 2) lowers it (block SOR). relax = 1.3 reaches a given error in about
  half the outer iterations (rms error after 4: 4e-4, plain alternation: 9e-4; 1.7 is worse).
- **Stopping rule**: start with u = f and the exact s-step for it, then alternate u- and s-steps
  until the change of u in one outer iteration, ||u_k - u_{k-1}|| / ||f||, is below ``tol`` for
  every image of the chunk, or ``max_outer`` iterations. The alternation converges linearly
  (the change halves per iteration) and few CG steps per subproblem suffice (more do not speed
  up the outer convergence). Defaults: max_outer 5, tol 1e-3, 2 + 1 CG steps, relax 1.3. Their
  order-3 bases differ from a converged solve (300 iterations) by rms 3-5e-4 on 256 px photos;
  0.07-0.1% of the values are off by more than one 8-bit level (1/255), at most 0.09, at edge
  pixels that the converged solve turns into edges later (benchmarks/bench_decompose.py).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from cartlib.checks import check_images

DEFAULT_EPS = 0.1  # edge width in pixels (see the module docstring for the measurements)
SOLVER_VERSION = 1  # bump when a change alters the result (it keys the on-disk cache)
CPU_CHUNK = 1 << 19  # values per CPU chunk (2 MB of float32): 1.3-1.7x faster than a whole batch


# ------------------------------------------------------------------------------ finite differences
def grad(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences with Neumann boundaries. (B, C, H, W) -> two (B, C, H, W): the
    difference along H (zero on the last row) and along W (zero on the last column)."""
    gh = torch.zeros_like(u)
    gw = torch.zeros_like(u)
    torch.sub(u[..., 1:, :], u[..., :-1, :], out=gh[..., :-1, :])
    torch.sub(u[..., :, 1:], u[..., :, :-1], out=gw[..., :, :-1])
    return gh, gw


def div(ph: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """Discrete divergence, the negative adjoint of :func:`grad`: <grad u, p> = -<u, div p>."""
    out = torch.zeros_like(ph)
    out[..., :-1, :] += ph[..., :-1, :]
    out[..., 1:, :] -= ph[..., :-1, :]
    out[..., :, :-1] += pw[..., :, :-1]
    out[..., :, 1:] -= pw[..., :, :-1]
    return out


def _grad_sq(u: torch.Tensor) -> torch.Tensor:
    """g = sum_c |grad u_c|^2, (B, C, H, W) -> (B, 1, H, W)."""
    g = u.new_zeros(u.shape[0], 1, *u.shape[2:])
    g[..., :-1, :] += torch.sub(u[..., 1:, :], u[..., :-1, :]).square_().sum(1, keepdim=True)
    g[..., :, :-1] += torch.sub(u[..., :, 1:], u[..., :, :-1]).square_().sum(1, keepdim=True)
    return g


def at_energy(f, u, s, alpha=1.0, lam=0.01, eps=DEFAULT_EPS) -> torch.Tensor:
    """The Ambrosio-Tortorelli energy (Eq. 4) of each image, in pixel units. -> (B,)"""
    data = (u - f).square().sum((1, 2, 3))
    smooth = alpha * ((1 - s).square() * _grad_sq(u)).sum((1, 2, 3))
    edge = lam * (eps * _grad_sq(s) + s.square() / (4 * eps)).sum((1, 2, 3))
    return data + smooth + edge


# ---------------------------------------------------------------------------------- linear algebra
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-(image, channel) inner products over (H, W): (B, C, H, W) -> (B, C, 1, 1)."""
    return torch.linalg.vecdot(a.flatten(2), b.flatten(2))[..., None, None]


def _weighted_laplacian(v, wh, ww, out):
    """out += D^T diag(w) D v with wh, ww (B, 1, H-1, W), (B, 1, H, W-1) the edge weights."""
    t = torch.sub(v[..., 1:, :], v[..., :-1, :]).mul_(wh)  # weighted d/dh on H-1 rows
    out[..., 1:, :] += t  # D^T t: (D^T t)_i = t_{i-1} - t_i
    out[..., :-1, :] -= t
    t = torch.sub(v[..., :, 1:], v[..., :, :-1]).mul_(ww)
    out[..., :, 1:] += t
    out[..., :, :-1] -= t
    return out


def _neighbour_sum(wh, ww, shape):
    """The diagonal of D^T diag(w) D: each pixel's sum of the weights of its (up to 4) links."""
    d = wh.new_zeros(shape)
    d[..., 1:, :] += wh
    d[..., :-1, :] += wh
    d[..., :, 1:] += ww
    d[..., :, :-1] += ww
    return d


def pcg(apply, b, x, inv_diag, iters: int, relax: float = 1.0):
    """``iters`` Jacobi-preconditioned CG steps on A x = b from ``x``, batched: every (image,
    channel) slice is its own CG run. ``apply(v)`` returns A v (A symmetric positive definite),
    ``inv_diag`` is 1 / diag(A) (broadcastable). With d the CG step (x_cg = x + d), x becomes
    x + relax * d in place; returns d.

    x_cg minimises the quadratic over x + Krylov space, so along the line x + t d the quadratic
    is symmetric about t = 1: any relax in (0, 2) lowers it (over-relaxation, used by the solver).
    """
    r = b - apply(x)
    z = r * inv_diag
    p = z.clone()
    d = torch.zeros_like(x)
    rz = _dot(r, z)
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(iters):
        ap = apply(p)
        step = rz / _dot(p, ap).clamp_min(tiny)
        d.addcmul_(step, p)
        r.addcmul_(step, ap, value=-1)
        torch.mul(r, inv_diag, out=z)
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz.clamp_min(tiny)).add_(z)
        rz = rz_new
    x.add_(d, alpha=relax)
    return d


# --------------------------------------------------------------------------------------- the steps
def u_step(f, u, s, alpha: float, iters: int, relax: float = 1.0):
    """Lower E over u for fixed s (in place; returns the CG step): PCG on
    (I + alpha D^T diag((1-s)^2) D) u = f, the u-subproblem of Eq. 4."""
    w = (1 - s).square_().mul_(alpha)  # (B, 1, H, W)
    wh, ww = w[..., :-1, :].contiguous(), w[..., :, :-1].contiguous()
    inv_diag = _neighbour_sum(wh, ww, w.shape).add_(1).reciprocal_()

    def apply(v):
        return _weighted_laplacian(v, wh, ww, v.clone())

    return pcg(apply, f, u, inv_diag, iters, relax)


def s_step(u, s, alpha: float, lam: float, eps: float, iters: int, relax: float = 1.0):
    """Lower E over s for fixed u (exact subproblem, see module docstring; in place), then clip
    to [0, 1]: PCG on (alpha g + lam/(4 eps)) s + lam eps D^T D s = alpha g, g = sum_c |grad u_c|^2.
    """
    rhs = _grad_sq(u).mul_(alpha)  # (B, 1, H, W)
    diag = rhs + lam / (4 * eps)
    k = lam * eps
    wh = torch.full_like(s[..., :-1, :], k)
    ww = torch.full_like(s[..., :, :-1], k)
    inv_diag = (diag + _neighbour_sum(wh, ww, s.shape)).reciprocal_()

    def apply(v):
        return _weighted_laplacian(v, wh, ww, diag * v)

    pcg(apply, rhs, s, inv_diag, iters, relax)
    return s.clamp_(0, 1)


# ------------------------------------------------------------------------------------ validation
def check_params(alpha, lam, eps) -> float:
    """Raise ValueError unless alpha, lam, eps (None = DEFAULT_EPS) are positive finite numbers;
    return eps."""
    eps = DEFAULT_EPS if eps is None else eps
    for name, v, paper in (("alpha", alpha, "1"), ("lam", lam, "0.01"), ("eps", eps, "0.1")):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v < float("inf"):
            raise ValueError(
                f"{name}={v!r} must be a positive finite number (paper/default: {name}={paper})"
            )
    return float(eps)


def check_input(x, name: str = "x") -> torch.Tensor:
    """Raise ValueError unless ``x`` is a float32/64 (B, C, H, W) tensor in [0, 1], C = 1 or 3."""
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] not in (1, 3):
        hint = (
            "; it looks channels-last: use x.permute(0, 3, 1, 2)" if x.shape[-1] in (1, 3) else ""
        )
        raise ValueError(
            f"{name} must have 1 (grey) or 3 (RGB) channels in dim 1, got shape "
            f"{tuple(x.shape)}{hint}"
        )
    if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"{name} has dtype {x.dtype}; pass float32 or float64, e.g. x.float()")
    check_images(x, name)
    if min(x.shape[-2:]) < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got shape {tuple(x.shape)}")
    return x


# ------------------------------------------------------------------------------------- the solver
@dataclass
class ATInfo:
    """What :func:`ambrosio_tortorelli` did. ``changes``: the relative change of u in each outer
    iteration (max over the batch); ``energies`` (only with return_info=True): (steps, B), the
    energy of (f, s_init or 0), then after the initial s-step and after every u- and s-step."""

    outer: int = 0
    converged: bool = False
    changes: list[float] = field(default_factory=list)
    energies: torch.Tensor | None = None


def ambrosio_tortorelli(
    x: torch.Tensor,
    alpha: float = 1.0,
    lam: float = 0.01,
    eps: float | None = None,
    *,
    max_outer: int = 5,
    tol: float = 1e-3,
    cg_iters: int = 2,
    s_cg_iters: int = 1,
    relax: float = 1.3,
    s_init: torch.Tensor | None = None,
    chunk: int | None = None,
    return_info: bool = False,
    validate: bool = True,
):
    """Edge-preserving smoothing u of images x by alternating minimisation of Eq. 4.

    x: (B, C, H, W) float32/float64 in [0, 1], C = 3 (or 1), on any device; computed in x's dtype.
    Returns ``(u, s)``: u (B, C, H, W) the smooth base, s (B, 1, H, W) in [0, 1] the shared edge
    map (1 on edges); with ``return_info=True`` also an :class:`ATInfo`. eps=None is
    :data:`DEFAULT_EPS`. See the module docstring for the discretisation, eps and the solver.

    Solver settings: at most ``max_outer`` outer iterations (u-step of ``cg_iters`` PCG steps,
    then s-step of ``s_cg_iters``), stopped early once the relative change of u is below ``tol``;
    ``relax`` in (0, 2) over-relaxes both steps (1 = plain alternation); ``s_init`` (B, 1, H, W)
    warm-starts the edge map (base_detail passes the previous level's); ``chunk`` images are
    solved at a time (None: the whole batch on GPUs, cache-sized chunks of about
    :data:`CPU_CHUNK` values on CPUs, ~1.3x faster there); each image's result does not depend on
    the others. ``validate=False`` skips the input checks (for bases this solver produced).
    """
    eps = check_params(alpha, lam, eps)
    _check_solver(max_outer, tol, cg_iters, s_cg_iters, relax)
    if validate:
        check_input(x)
    b, c, h, w = x.shape
    if s_init is not None and tuple(s_init.shape) != (b, 1, h, w):
        raise ValueError(f"s_init must have shape {(b, 1, h, w)}, got {tuple(s_init.shape)}")
    # Grey images (equal channels): C identical channels are one channel with lam / C
    # (E_C(u, s) = C * E_1(u, s; lam / C)), solved C times faster and exactly equivalent.
    grey = c > 1 and bool((x == x[:, :1]).all())
    f, lam_f = (x[:, :1], lam / c) if grey else (x, lam)
    if chunk is None:
        chunk = b if x.device.type != "cpu" else max(1, CPU_CHUNK // f[0].numel())
    settings = (max_outer, tol, cg_iters, s_cg_iters, relax, return_info)
    parts = [
        _solve(f[i : i + chunk], alpha, lam_f, eps, _rows(s_init, i, chunk), *settings)
        for i in range(0, b, chunk)
    ]
    u = torch.cat([p[0] for p in parts])
    s = torch.cat([p[1] for p in parts])
    info = _merge([p[2] for p in parts], c if grey else 1)
    if grey:
        u = u.repeat(1, c, 1, 1)
    return (u, s, info) if return_info else (u, s)


def _rows(t, i, n):
    return None if t is None else t[i : i + n]


def _merge(infos: list[ATInfo], energy_scale: int) -> ATInfo:
    """One ATInfo for a batch solved in chunks (a chunk that stopped early keeps its energy)."""
    outer = max(i.outer for i in infos)
    changes = [max(i.changes[k] for i in infos if k < len(i.changes)) for k in range(outer)]
    energies = None
    if infos[0].energies is not None:
        steps = max(len(i.energies) for i in infos)
        padded = [
            torch.cat([e, e[-1:].expand(steps - len(e), -1)]) for e in (i.energies for i in infos)
        ]
        energies = torch.cat(padded, 1) * energy_scale
    return ATInfo(outer, all(i.converged for i in infos), changes, energies)


def _check_solver(max_outer, tol, cg_iters, s_cg_iters, relax) -> None:
    for name, v in (("max_outer", max_outer), ("cg_iters", cg_iters), ("s_cg_iters", s_cg_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1")
    if not tol >= 0:
        raise ValueError(f"tol={tol!r} must be >= 0 (0 = always run max_outer iterations)")
    if not 0 < relax < 2:
        raise ValueError(f"relax={relax!r} must lie in (0, 2) for the energy to decrease; use 1.3")


def _solve(f, alpha, lam, eps, s_init, max_outer, tol, cg_iters, s_cg_iters, relax, info_on):
    """The alternating minimisation on validated input (see :func:`ambrosio_tortorelli`)."""
    u = f.clone()  # (B, C, H, W), u_0 = f
    if s_init is None:
        s = f.new_zeros(f.shape[0], 1, *f.shape[2:])  # (B, 1, H, W), no edges
    else:
        s = s_init.to(f).clone().clamp_(0, 1)
    energy = (lambda: at_energy(f, u, s, alpha, lam, eps)) if info_on else (lambda: None)
    info, energies = ATInfo(), [energy()]
    f_norm = _dot(f, f).sum((1, 2, 3)).sqrt_().clamp_min_(torch.finfo(f.dtype).tiny)  # (B,)
    s_step(u, s, alpha, lam, eps, s_cg_iters)  # s_0: the edges of f itself
    energies.append(energy())
    for _ in range(max_outer):
        d = u_step(f, u, s, alpha, cg_iters, relax)
        energies.append(energy())
        s_step(u, s, alpha, lam, eps, s_cg_iters, relax)
        energies.append(energy())
        info.outer += 1
        change = relax * _dot(d, d).sum((1, 2, 3)).sqrt_() / f_norm  # ||u_k - u_k-1|| / ||f||
        info.changes.append(float(change.max()))
        if info.changes[-1] < tol:
            info.converged = True
            break
    if info_on:
        info.energies = torch.stack(energies)
    return u, s, info
