"""Mumford-Shah / Ambrosio-Tortorelli decomposition (Eq. 4-6) and its on-disk cache.

The independent references are scipy.sparse: the same discrete operators built as sparse
matrices (Kronecker products of 1-D forward differences) and solved directly with spsolve.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch
import torch.nn.functional as F

from cartlib.decompose import (
    DecomposedDataset,
    Decomposition,
    ambrosio_tortorelli,
    at_energy,
    base_detail,
    decompose_dataset,
    detail_share,
    div,
    grad,
)
from cartlib.decompose import cache as dcache
from cartlib.decompose import mumford_shah as ms
from cartlib.decompose.hierarchy import total_variation


# ------------------------------------------------------------------------------------ fixtures
def photos(size: int, dtype=torch.float64) -> torch.Tensor:
    """Centre crops of scikit-image photos, resized to size x size. -> (4, 3, size, size)"""
    import skimage.data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        a = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).double() / 255
        m = min(a.shape[1:])
        t, left = (a.shape[1] - m) // 2, (a.shape[2] - m) // 2
        a = a[None, :, t : t + m, left : left + m]
        out.append(F.interpolate(a, size=(size, size), mode="bilinear", antialias=True))
    return torch.cat(out).clamp(0, 1).to(dtype)


def noisy_step(size=64, height=0.6, sigma=0.05, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """A vertical step edge 0.2 -> 0.2 + height at column size/2, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.full((1, 3, size, size), 0.2, dtype=torch.float64)
    clean[..., size // 2 :] += height
    noise = sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return (clean + noise).clamp(0, 1), clean


def sparse_diffs(h: int, w: int):
    """Forward differences along H and W (zero on the last row/column) as sparse matrices acting
    on row-major flattened (H, W) images."""

    def d1(n):
        d = sp.diags([-np.ones(n), np.ones(n - 1)], [0, 1], shape=(n, n), format="lil")
        d[n - 1, n - 1] = 0
        return d.tocsr()

    return sp.kron(d1(h), sp.eye(w)).tocsr(), sp.kron(sp.eye(h), d1(w)).tocsr()


def sparse_u_system(s: np.ndarray, alpha: float):
    h, w = s.shape
    dh, dw = sparse_diffs(h, w)
    wgt = sp.diags(((1 - s) ** 2).ravel())
    return (sp.eye(h * w) + alpha * (dh.T @ wgt @ dh + dw.T @ wgt @ dw)).tocsc()


def sparse_s_system(u: np.ndarray, alpha: float, lam: float, eps: float):
    """The s-subproblem (alpha g + lam/(4 eps)) s + lam eps D^T D s = alpha g. u: (C, H, W)."""
    c, h, w = u.shape
    dh, dw = sparse_diffs(h, w)
    g = sum((dh @ u[k].ravel()) ** 2 + (dw @ u[k].ravel()) ** 2 for k in range(c))
    lap = dh.T @ dh + dw.T @ dw
    return (sp.diags(alpha * g + lam / (4 * eps)) + lam * eps * lap).tocsc(), alpha * g


def sparse_energy(f, u, s, alpha, lam, eps) -> float:
    c, h, w = f.shape
    dh, dw = sparse_diffs(h, w)
    wgt = ((1 - s) ** 2).ravel()
    smooth = sum(wgt @ ((dh @ u[k].ravel()) ** 2 + (dw @ u[k].ravel()) ** 2) for k in range(c))
    edge = eps * ((dh @ s.ravel()) ** 2 + (dw @ s.ravel()) ** 2).sum() + (s**2).sum() / (4 * eps)
    return float(((u - f) ** 2).sum() + alpha * smooth + lam * edge)


# --------------------------------------------------------------------------- discrete operators
def test_grad_div_adjoint_and_neumann():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, 3, 7, 11, generator=g, dtype=torch.float64)
    ph, pw = (torch.randn(2, 3, 7, 11, generator=g, dtype=torch.float64) for _ in range(2))
    gh, gw = grad(u)
    lhs = (gh * ph).sum() + (gw * pw).sum()  # <D u, p>
    rhs = -(u * div(ph, pw)).sum()  # <u, D^T p> with D^T = -div
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    assert gh[..., -1, :].abs().max() == 0 and gw[..., :, -1].abs().max() == 0  # Neumann
    assert torch.equal(gh[..., 2, 3], u[..., 3, 3] - u[..., 2, 3])
    const = torch.full((1, 3, 5, 5), 0.3, dtype=torch.float64)
    assert all(d.abs().max() == 0 for d in grad(const))


def test_energy_matches_sparse_formula():
    g = torch.Generator().manual_seed(2)
    f, u = (torch.rand(1, 3, 9, 12, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.rand(1, 1, 9, 12, generator=g, dtype=torch.float64)
    e = at_energy(f, u, s, 1.7, 0.03, 0.4).item()
    ref = sparse_energy(f[0].numpy(), u[0].numpy(), s[0, 0].numpy(), 1.7, 0.03, 0.4)
    assert e == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------- sparse direct references
def test_u_step_cg_matches_sparse_direct_solve():
    g = torch.Generator().manual_seed(3)
    f = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    s = torch.rand(1, 1, 16, 16, generator=g, dtype=torch.float64)
    u = f.clone()
    ms.u_step(f, u, s, alpha=2.0, iters=150)
    lu = spl.splu(sparse_u_system(s[0, 0].numpy(), 2.0))
    ref = np.stack([lu.solve(f[0, k].numpy().ravel()).reshape(16, 16) for k in range(3)])
    assert np.abs(u[0].numpy() - ref).max() < 1e-10


def test_s_step_matches_sparse_direct_solve():
    g = torch.Generator().manual_seed(4)
    u = torch.rand(1, 3, 16, 16, generator=g, dtype=torch.float64)
    s = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    ms.s_step(u, s, alpha=1.0, lam=0.01, eps=0.5, iters=150)  # eps = 0.5: grad-s term matters
    a, rhs = sparse_s_system(u[0].numpy(), 1.0, 0.01, 0.5)
    ref = spl.spsolve(a, rhs).reshape(16, 16)
    assert ref.min() >= 0 and ref.max() < 1  # the exact solution lies in [0, 1): no clipping
    assert np.abs(s[0, 0].numpy() - ref).max() < 1e-10


def test_converged_solver_matches_sparse_alternation():
    """Our over-relaxed, early-stopped PCG alternation reaches the same minimiser as plain
    alternation with exact sparse solves (the problem is nearly convex in pixel units)."""
    f, _ = noisy_step(size=16, seed=5)
    u, s = ambrosio_tortorelli(f, max_outer=3000, tol=1e-13, cg_iters=4, s_cg_iters=2)
    fn = f[0].numpy()
    un, sn = fn.copy(), np.zeros((16, 16))
    for _ in range(400):
        a, rhs = sparse_s_system(un, 1.0, 0.01, ms.DEFAULT_EPS)
        sn = np.clip(spl.spsolve(a, rhs), 0, 1).reshape(16, 16)
        lu = spl.splu(sparse_u_system(sn, 1.0))
        un = np.stack([lu.solve(fn[k].ravel()).reshape(16, 16) for k in range(3)])
    assert np.abs(u[0].numpy() - un).max() < 1e-6
    assert np.abs(s[0, 0].numpy() - sn).max() < 1e-5


# ------------------------------------------------------------------------------ solver properties
@pytest.mark.parametrize(
    "settings",
    [{}, {"relax": 1.0}, {"relax": 1.9, "cg_iters": 1}, {"cg_iters": 5, "s_cg_iters": 4}],
)
def test_energy_never_increases_and_s_in_unit_interval(settings):
    f = torch.cat([photos(32), noisy_step(32)[0]])
    u, s, info = ambrosio_tortorelli(f, max_outer=12, tol=0, return_info=True, **settings)
    e = info.energies  # (steps, B): (f, 0), after s_0, then after every u- and s-step
    assert e.shape == (2 + 2 * 12, 5)
    assert (e[1:] <= e[:-1] + 1e-12 * e[0]).all(), (e[1:] - e[:-1]).max()
    assert (e[-1] < 0.5 * e[0]).all()  # and it does decrease
    assert s.min() >= 0 and s.max() <= 1
    assert torch.allclose(e[-1], at_energy(f, u, s, 1.0, 0.01, ms.DEFAULT_EPS), rtol=1e-12)


def test_stopping_rule():
    f = photos(24)
    _, _, info = ambrosio_tortorelli(f, max_outer=50, tol=1e-3, return_info=True)
    assert info.converged and info.outer < 50 and info.changes[-1] < 1e-3
    assert all(c >= 1e-3 for c in info.changes[:-1])
    _, _, info = ambrosio_tortorelli(f, max_outer=2, tol=0, return_info=True)
    assert info.outer == 2 and not info.converged


def test_edge_kept_much_better_than_quadratic_smoothing():
    """Noisy step (64 x 64, height 0.6, sigma 0.05). Measured (defaults): one AT level removes
    67% of the flat-region noise (std 0.050 -> 0.017) and keeps 100% of the step within one
    pixel; quadratic smoothing (s = 0, alpha tuned to remove exactly as much noise, alpha ~0.84)
    keeps 48% of it (ratio 2.1). Order 3: noise -87%, step kept 100% vs 22% (ratio 4.6)."""
    f, _ = noisy_step()
    flat = torch.ones(64, 64, dtype=torch.bool)
    flat[:, 24:40] = False  # 8 px either side of the edge

    def noise(u):  # std about the column means (the step profile is constant along columns)
        return (u - u.mean(-2, keepdim=True))[..., flat].std().item()

    def step_in_one_pixel(u):
        return (u[..., 32] - u[..., 31]).mean().item() / 0.6

    def quadratic(a):
        u = f.clone()
        ms.u_step(f, u, torch.zeros_like(f[:, :1]), a, iters=150)
        return u

    for order, min_ratio in ((1, 1.7), (3, 3.5)):
        u = base_detail(f, order).base
        lo, hi = 1e-3, 1e3
        for _ in range(30):  # the alpha at which quadratic smoothing removes as much noise
            mid = (lo * hi) ** 0.5
            lo, hi = (mid, hi) if noise(quadratic(mid)) > noise(u) else (lo, mid)
        q = quadratic(mid)
        assert noise(u) < 0.4 * noise(f)  # most of the noise is gone
        assert step_in_one_pixel(u) > 0.95
        assert step_in_one_pixel(u) > min_ratio * step_in_one_pixel(q)


def test_float32_matches_float64_and_chunks_are_independent():
    x = photos(32)
    u64, s64 = ambrosio_tortorelli(x)
    u32, s32 = ambrosio_tortorelli(x.float())
    assert u32.dtype == torch.float32 and s32.dtype == torch.float32
    assert (u32.double() - u64).abs().max() < 1e-3
    u1, s1 = ambrosio_tortorelli(x, chunk=1)
    assert (u1 - u64).abs().max() < 1e-10 and (s1 - s64).abs().max() < 1e-10


def test_grey_images_solved_as_one_channel_exactly():
    grey = photos(24).mean(1, keepdim=True).expand(-1, 3, -1, -1).contiguous()
    u, s = ambrosio_tortorelli(grey, max_outer=4, tol=0)
    u3, s3, _ = ms._solve(grey, 1.0, 0.01, ms.DEFAULT_EPS, None, 4, 0, 2, 1, 1.3, False)
    assert (u - u3).abs().max() < 1e-10 and (s - s3).abs().max() < 1e-10
    u1, _ = ambrosio_tortorelli(grey[:, :1], lam=0.01 / 3, max_outer=4, tol=0)
    assert (u[:, :1] - u1).abs().max() < 1e-12


# --------------------------------------------------------------------------------- the hierarchy
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_additivity(dtype, tol):
    x = torch.cat([photos(24, dtype), noisy_step(24)[0].to(dtype)])
    dec = base_detail(x, order=3)
    assert dec.order == 3 and len(dec.bases) == 3 and len(dec.edges) == 3
    assert dec.base is dec.bases[-1] and dec.base.dtype == dtype
    assert torch.equal(dec.details[0], x - dec.bases[0])  # D_1 = I - B_1 (finest)
    assert torch.equal(dec.details[2], dec.bases[1] - dec.bases[2])  # D_3 = B_2 - B_3
    assert (x - (dec.base + sum(dec.details))).abs().max() <= tol
    assert (x - dec.reconstruct()).abs().max() <= tol


def test_order_zero_and_bad_order():
    x = photos(8)
    dec = base_detail(x, order=0)
    assert torch.equal(dec.base, x) and dec.details == [] and dec.bases == []
    for order in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"order={order!r}"):
            base_detail(x, order=order)


def test_total_variation_falls_level_by_level():
    x = photos(48)
    dec = base_detail(x, order=3)
    tv = torch.stack([total_variation(b) for b in (x, *dec.bases)])  # (4, B)
    assert (tv[1:] < tv[:-1]).all(), tv
    assert (tv[-1] < 0.85 * tv[0]).all()  # B_3 is visibly smoother than I


def test_detail_share_of_hand_made_layers_is_known_in_closed_form():
    """I = 0.5 + D_1 + D_2 with D_1 a +-0.1 checkerboard and D_2 +-0.2 halves (orthogonal, mean 0):
    Var(I) = 0.01 + 0.04, so the details hold all of it, D_1 a fifth and D_2 four fifths."""
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    d1 = (0.1 * (-1.0) ** (i + j)).double().expand(2, 3, 8, 8)
    d2 = torch.where(j < 4, -0.2, 0.2).double().expand(2, 3, 8, 8)
    base = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    x = base + d1 + d2
    share = detail_share(x, dec=Decomposition(base=base, details=[d1, d2]))
    assert share.total == pytest.approx(1.0) and share.layers == pytest.approx([0.2, 0.8])


def test_detail_share_matches_a_direct_numpy_computation():
    x = torch.cat([photos(16), torch.full((1, 3, 16, 16), 0.3, dtype=torch.float64)])
    share = detail_share(x, order=2)
    dec = base_detail(x, order=2)
    a = x.numpy()
    expected = ((a - dec.base.numpy()) ** 2).sum() / (a.size * a.var())
    assert share.total == pytest.approx(expected, rel=1e-9) and 0 < share.total < 0.2
    assert share.layers == pytest.approx(
        [(d.numpy() ** 2).sum() / (a.size * a.var()) for d in dec.details], rel=1e-9
    )
    flat = base_detail(x[-1:], order=2)  # AT leaves a constant image as it is: no details
    assert flat.details[0].abs().max() < 1e-12
    with pytest.raises(ValueError, match="Var"):
        detail_share(x[-1:], order=2)


# -------------------------------------------------------------------------------------- bad input
BAD_INPUTS = [
    (lambda x: x * 255, r"got values in \[.*, 2..\..\]; it looks like 0-255 data: divide by 255"),
    (lambda x: (x * 255).to(torch.uint8), r"dtype torch.uint8.*x.float\(\) / 255"),
    (lambda x: x - 0.5, r"\[0, 1\]"),
    (lambda x: x[0], r"4-D.*unsqueeze\(0\)"),
    (lambda x: x.permute(0, 2, 3, 1), r"permute\(0, 3, 1, 2\)"),
    (lambda x: x[:, :2], r"1 \(grey\) or 3 \(RGB\) channels"),
    (lambda x: x.half(), r"float16.*x.float\(\)"),
    (lambda x: x.index_fill(-1, torch.tensor([3]), float("nan")), "NaN"),
    (lambda x: x.index_fill(-1, torch.tensor([3]), float("inf")), "inf"),
    (lambda x: x.numpy(), "torch.Tensor"),
]


@pytest.mark.parametrize("make, message", BAD_INPUTS)
def test_bad_images_are_refused_with_the_fix(make, message):
    x = photos(8, torch.float32)
    with pytest.raises(ValueError, match=message):
        ambrosio_tortorelli(make(x))
    with pytest.raises(ValueError, match=message):
        base_detail(make(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0}, "alpha=0 must be a positive"),
        ({"lam": -0.01}, "lam=-0.01 must be a positive"),
        ({"eps": 0.0}, "eps=0.0 must be a positive"),
        ({"eps": float("nan")}, "eps=nan"),
        ({"relax": 2.0}, "relax=2.0"),
        ({"max_outer": 0}, "max_outer=0"),
    ],
)
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ambrosio_tortorelli(photos(8), **kwargs)


# ----------------------------------------------------------------------------------- disk cache
class Images(torch.utils.data.Dataset):
    def __init__(self, x, key="test-images"):
        self.x, self.key, self.classes, self.num_classes = x.float(), key, ["a", "b"], 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CART_CACHE_DIR", str(tmp_path))
    return tmp_path / "decompose"


def test_cache_round_trip(cache_home, monkeypatch):
    x = photos(16, torch.float32)
    ds = Images(x)
    bases = decompose_dataset(ds, order=2, batch_size=3, progress=False)
    assert bases.shape == (4, 2, 3, 16, 16) and bases.dtype == torch.float16
    ref = base_detail(x, 2)
    assert (bases[:, 1].float() - ref.base).abs().max() < 1e-3  # float16 storage
    details = (bases[:, 0].float() - bases[:, 1].float()) - ref.details[1]
    assert details.abs().max() < 1e-3 and details.square().mean().sqrt() < 2e-4
    files = list(cache_home.glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("test-images-o2-")

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(dcache, "base_detail", no_recompute)
    dds = DecomposedDataset(ds, order=2, progress=False)
    image, b, label = dds[2]
    assert torch.equal(image, x[2]) and label == 0 and b.dtype == torch.float32
    assert torch.equal(b, bases[2].float()) and len(dds) == 4 and dds.num_classes == 2
    monkeypatch.undo()
    monkeypatch.setenv("CART_CACHE_DIR", str(cache_home.parent))
    decompose_dataset(ds, order=2, lam=0.02, limit=3, progress=False)  # other key: new file
    assert len(list(cache_home.glob("*.pt"))) == 2


def test_cache_stores_grey_datasets_as_one_channel(cache_home):
    grey = photos(16, torch.float32).mean(1, keepdim=True).expand(-1, 3, -1, -1)
    bases = decompose_dataset(Images(grey, "grey"), order=1, progress=False)
    assert bases.shape == (4, 1, 3, 16, 16) and torch.equal(bases[:, :, 0], bases[:, :, 2])
    (path,) = cache_home.glob("*.pt")
    assert torch.load(path, weights_only=True)["bases"].shape == (4, 1, 1, 16, 16)


@pytest.mark.parametrize(
    "spoil, reason",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read"),
        (lambda p: p.write_bytes(b"not a torch file"), "cannot be read"),
        (lambda p: torch.save({"weights": torch.zeros(3)}, p), "not a decomposition cache"),
    ],
)
def test_corrupt_cache_is_recomputed_with_a_warning(cache_home, spoil, reason):
    ds = Images(photos(12, torch.float32))
    first = decompose_dataset(ds, order=1, progress=False)
    (path,) = cache_home.glob("*.pt")
    spoil(path)
    with pytest.warns(UserWarning, match=f"{path.name}.*{reason}.*recomputing"):
        again = decompose_dataset(ds, order=1, progress=False)
    assert torch.equal(again, first)
    assert torch.load(path, weights_only=True)["bases"].shape == (4, 1, 3, 12, 12)  # rewritten


def test_cache_notices_changed_data(cache_home):
    x = photos(12, torch.float32)
    decompose_dataset(Images(x), order=1, progress=False)
    with pytest.warns(UserWarning, match="fingerprint images differ"):
        decompose_dataset(Images(x.flip(-1)), order=1, progress=False)


def test_cache_needs_a_dataset_identity(cache_home):
    plain = torch.utils.data.TensorDataset(photos(8, torch.float32), torch.zeros(4))
    with pytest.raises(ValueError, match="name="):
        decompose_dataset(plain, order=1, progress=False)
    assert decompose_dataset(plain, order=1, name="plain", progress=False).shape[0] == 4


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    x = photos(32)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        cpu = base_detail(x.to(dtype), order=3)
        gpu = base_detail(x.to(dtype).cuda(), order=3)
        assert gpu.base.is_cuda and gpu.base.dtype == dtype
        assert (gpu.base.cpu() - cpu.base).abs().max() < tol
        assert (x.to(dtype).cuda() - gpu.reconstruct()).abs().max() < 1e-5


# ------------------------------------------------------------------------------------ figures
def test_figures_are_saved_and_the_panel_redraws(tmp_path):
    import ipywidgets as widgets
    import matplotlib

    from cartlib import viz

    matplotlib.use("Agg")
    x = photos(16, torch.float32)
    dec = base_detail(x, order=2)
    viz.save_open_figures(tmp_path, "old")  # start from an empty registry
    fig = viz.decomposition_figure(x[1], dec, 1)
    assert len(fig.axes) == 5 + 1  # I, B_2, D_2, D_1, s_2 and the colour bar
    viz.decomposition_rows_figure(x, dec, title="rows")
    paths = viz.save_open_figures(tmp_path, "01")
    assert [p.name for p in paths] == ["01_00_figure.png", "01_01_rows.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert viz.save_open_figures(tmp_path, "01") == []  # saved once

    def draw(order):
        return viz.decomposition_figure(x[0], base_detail(x[:1], order))

    slider = widgets.IntSlider(value=1, min=0, max=3)
    panel = viz.figure_panel(draw, order=slider)
    image = panel.children[1]
    first = image.value
    assert first[:4] == b"\x89PNG"
    slider.value = 3
    assert image.value[:4] == b"\x89PNG" and image.value != first
