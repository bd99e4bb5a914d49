"""Image decompositions for CART (step 2 of the data flow): Mumford-Shah base/detail.

- :func:`ambrosio_tortorelli` — edge-preserving smoothing, Eq. 4 (``mumford_shah.py``).
- :func:`base_detail` — the order-n hierarchy I = B_n + D_n + ... + D_1, Eq. 5-6 (``hierarchy.py``);
  :func:`detail_share` — how much of a dataset's variance its detail layers carry.
- :class:`DecomposedDataset` / :func:`decompose_dataset` — the on-disk cache for training
  (``cache.py``).
"""

from cartlib.decompose.cache import DecomposedDataset, decompose_dataset
from cartlib.decompose.hierarchy import Decomposition, DetailShare, base_detail, detail_share
from cartlib.decompose.mumford_shah import (
    DEFAULT_EPS,
    SOLVER_VERSION,
    ATInfo,
    ambrosio_tortorelli,
    at_energy,
    div,
    grad,
)

__all__ = [
    "DEFAULT_EPS",
    "SOLVER_VERSION",
    "ATInfo",
    "Decomposition",
    "DecomposedDataset",
    "DetailShare",
    "ambrosio_tortorelli",
    "at_energy",
    "base_detail",
    "decompose_dataset",
    "detail_share",
    "div",
    "grad",
]
