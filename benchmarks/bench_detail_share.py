"""Detail share of each registered dataset, printed as a markdown table.

    .venv/bin/python benchmarks/bench_detail_share.py [--resolution 32] [--order 3] [--limit 256]

For the first ``--limit`` test images of each dataset at ``--resolution`` px:
||I - B_n||^2 / (N Var(I)) and each layer's ||D_k||^2 / (N Var(I)) under the order-``--order``
hierarchy with the config's Ambrosio-Tortorelli defaults (:func:`cartlib.decompose.detail_share`;
Var(I) is the variance of all values of the set). It says how much a dataset's details can show
in next-detail generation. CIFAR-10 is measured only when it is on disk (never downloaded); the
reason is printed otherwise. Never part of the test pass/fail.
"""

from __future__ import annotations

import argparse

import torch

from cartlib.config import DecomposeConfig
from cartlib.data import load_dataset
from cartlib.decompose import detail_share

DATASETS = ("fashion-mnist", "photos", "skimage-photos", "cifar10")


def images(name: str, resolution: int, limit: int) -> torch.Tensor:
    ds = load_dataset(name, "test", resolution, limit=limit, download=False, progress=False)
    return torch.stack([ds[i][0] for i in range(len(ds))])  # (B, 3, R, R)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--limit", type=int, default=256)
    a = p.parse_args()
    at = DecomposeConfig()
    n = a.order
    layers = " | ".join(f"D_{k}" for k in range(n, 0, -1))
    print(
        f"detail share at {a.resolution}x{a.resolution}, order {n} "
        f"(alpha={at.alpha}, lam={at.lam}, eps={at.eps or 'default'}), test split\n"
    )
    print(f"| dataset | images | Var(I) | I - B_{n} | {layers} |")
    print("|---|---:|---:|---:|" + "---:|" * n)
    skipped = []
    for name in DATASETS:
        try:
            x = images(name, a.resolution, a.limit).double()
        except Exception as err:  # a dataset missing offline is reported, not fatal
            reason = " ".join(str(err).split())
            skipped.append(f"{name}: {type(err).__name__}: {reason[:200]}")
            continue
        share = detail_share(x, n, alpha=at.alpha, lam=at.lam, eps=at.eps)
        cells = " | ".join(f"{100 * s:.2f} %" for s in reversed(share.layers))
        print(
            f"| {name} | {len(x)} | {x.var(unbiased=False).item():.4f} | "
            f"{100 * share.total:.2f} % | {cells} |"
        )
    for line in skipped:
        print(f"\nskipped {line}")


if __name__ == "__main__":
    main()
