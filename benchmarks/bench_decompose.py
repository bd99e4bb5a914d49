"""Throughput of the order-3 base-detail decomposition (Eq. 4-6), printed as a markdown table.

    .venv/bin/python benchmarks/bench_decompose.py [--size 256] [--batch 16] [--repeats 3]

Images: ``--batch`` crops of scikit-image's colour photos at ``--size`` px (cartlib.data
"skimage-photos"). Rows: cartlib's batched torch solver (float32, float64; CUDA when present),
(a) a naive per-image scipy sparse direct solve of the same functional with the same number of
outer iterations (timed on ``--sparse-images`` images and extrapolated), and (b) scikit-image's
``denoise_tv_chambolle`` applied 3 times (an edge-preserving smoother of similar cost, for scale).
Ratios are relative to cartlib float32 on the CPU. Also printed: the error of the default solver
settings against a converged solve. Timings are the best of ``--repeats`` runs; other processes
on the machine (see the load average printed) slow torch's multi-threaded ops a lot. Never part
of the test pass/fail.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spl
import torch

from cartlib.data import load_dataset
from cartlib.decompose import ambrosio_tortorelli, base_detail
from cartlib.decompose.mumford_shah import DEFAULT_EPS


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, threads, CUDA kernels)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def sparse_at(f: np.ndarray, outer: int, alpha=1.0, lam=0.01, eps=DEFAULT_EPS) -> np.ndarray:
    """Plain alternation with direct sparse solves (splu / spsolve); f (C, H, W) -> u."""
    c, h, w = f.shape

    def d1(n):
        d = sp.diags([-np.ones(n), np.ones(n - 1)], [0, 1], shape=(n, n), format="lil")
        d[n - 1, n - 1] = 0
        return d.tocsr()

    dh, dw = sp.kron(d1(h), sp.eye(w)).tocsr(), sp.kron(sp.eye(h), d1(w)).tocsr()
    lap = (dh.T @ dh + dw.T @ dw).tocsr()
    u = f.reshape(c, -1).copy()

    def s_step(u):
        g = sum((dh @ u[k]) ** 2 + (dw @ u[k]) ** 2 for k in range(c))
        a = (sp.diags(alpha * g + lam / (4 * eps)) + lam * eps * lap).tocsc()
        return np.clip(spl.spsolve(a, alpha * g), 0, 1)

    s = s_step(u)
    for _ in range(outer):
        wgt = sp.diags((1 - s) ** 2)
        lu = spl.splu((sp.eye(h * w) + alpha * (dh.T @ wgt @ dh + dw.T @ wgt @ dw)).tocsc())
        u = np.stack([lu.solve(f[k].ravel()) for k in range(c)])
        s = s_step(u)
    return u.reshape(c, h, w)


def sparse_order3(x: torch.Tensor, outer: int) -> None:
    for img in x.double().numpy():
        b = img
        for _ in range(3):
            b = sparse_at(b, outer)


def skimage_tv3(x: torch.Tensor) -> None:
    from skimage.restoration import denoise_tv_chambolle

    for img in x.permute(0, 2, 3, 1).numpy():
        for _ in range(3):
            img = denoise_tv_chambolle(img, channel_axis=-1)


def accuracy(x: torch.Tensor) -> tuple[float, float, int]:
    """Max and rms |B_3 - B_3 converged| of the defaults, and the outer iterations they used."""
    fast = base_detail(x.double(), 3).base
    ref = base_detail(x.double(), 3, max_outer=300, tol=1e-7, cg_iters=8, s_cg_iters=4).base
    _, _, info = ambrosio_tortorelli(x.double(), return_info=True)
    err = (fast - ref).abs()
    return err.max().item(), err.square().mean().sqrt().item(), info.outer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sparse-images", type=int, default=2)
    p.add_argument("--gpu-batch", type=int, default=256, help="extra CUDA row at this batch")
    a = p.parse_args()
    ds = load_dataset("skimage-photos", "test", a.size, limit=a.batch, progress=False)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (B, 3, size, size) float32
    n = len(x)
    rows = []  # (method, dtype, device, images/s, note)

    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        t = best_time(lambda xd=xd: base_detail(xd, 3), a.repeats)
        rows.append(("cartlib AT, order 3", str(dtype)[6:], "cpu", n / t, f"batch {n}"))
    if torch.cuda.is_available():
        for batch in (n, a.gpu_batch):
            xg = x.repeat((batch + n - 1) // n, 1, 1, 1)[:batch].cuda()
            t = best_time(lambda xg=xg: base_detail(xg, 3), a.repeats)
            rows.append(("cartlib AT, order 3", "float32", "cuda", batch / t, f"batch {batch}"))
    max_err, rms_err, outer = accuracy(x[:4])
    k = min(a.sparse_images, n)
    t = best_time(lambda: sparse_order3(x[:k], outer), 1) * n / k
    rows.append(("(a) scipy sparse direct, per image", "float64", "cpu", n / t,
                 f"{outer} outer iter./level; timed on {k} images, extrapolated"))  # fmt: skip
    for dtype in (np.float32, np.float64):
        xs = x.double() if dtype == np.float64 else x
        t = best_time(lambda xs=xs: skimage_tv3(xs), a.repeats)
        rows.append(("(b) skimage denoise_tv_chambolle x3", dtype.__name__, "cpu", n / t, ""))

    ours = rows[0][3]
    print(f"\norder-3 decomposition of {n} images {a.size}x{a.size}x3 (skimage photo crops); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| method | dtype | device | images/s | ratio to cartlib float32 CPU | note |")
    print("|---|---|---|---:|---:|---|")
    for method, dtype, device, ips, note in rows:
        print(f"| {method} | {dtype} | {device} | {ips:.3g} | {ips / ours:.3g} | {note} |")
    print(f"\naccuracy of the defaults (float64, 4 images): |B_3 - B_3 converged| max "
          f"{max_err:.1e}, rms {rms_err:.1e}; level 1 used {outer} outer iterations")  # fmt: skip


if __name__ == "__main__":
    main()
