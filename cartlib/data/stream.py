"""The streaming data path: any registry dataset, read lazily, augmented, in step-exact batches.

    registry dataset -> ItemSource (per request: decode, resize, crop, mirror -> uint8 (3, R, R))
      -> StepSampler (the requests of step s: a pure function of (seed, s), this process's slice)
      -> batches(): DataLoader workers + pinned memory (or the main process when workers = 0)
      -> the training device: float in [0, 1] -> Bases (on-disk cache, or decomposed per batch)

Design decisions:

- **Exact resume without sampler state.** The items of step s are ``perm_e[i*B:(i+1)*B]`` of the
  epoch-e permutation seeded by (seed, e), as before, and their crops and mirrors are drawn from
  (seed, s) (:mod:`cartlib.data.augment`). A resumed run asks for step s and gets the same batch.
- **Sharding across processes**: every process draws the same global batch and takes its slice
  ``[rank::world]`` (rank and world from accelerate), so the union over processes is the global
  batch of a 1-process run.
- **uint8 until the device.** Workers ship uint8 (4x less than float through shared memory and
  the pinned copy); the conversion to float happens on the training device.
- **One pipeline, one switch for the decomposition.** ``data.cache_bases`` picks where the bases
  B_1..B_n come from: the on-disk cache of :mod:`cartlib.decompose.cache` (small datasets: computed
  once, on the device, for the un-augmented centre crops, looked up by item index) or
  :func:`~cartlib.decompose.base_detail` on each batch on the training device (ImageNet size; the
  only choice with random crops or mirrors, whose bases differ per step).
- **A fast path for in-memory datasets** (Fashion-MNIST, CIFAR-10 already resized to R x R, no
  resize before the crop): a batch is a gather from the uint8 tensor, no per-item Python. It is
  the same requests and the same result as the per-item path (tested).
- Image files are kept as one numpy bytes array of relative paths (not a list of Path objects),
  so forked workers do not copy them page by page through reference counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch.utils.data import DataLoader, Dataset

from cartlib.config import ConfigError, DataConfig
from cartlib.data import load_dataset_from_config
from cartlib.data.arrays import ArrayDataset, resize_uint8
from cartlib.data.augment import Crop, centre, crop_tensor, draw, hash_seed, mid_size
from cartlib.data.folder import ImageFolderDataset, read_image
from cartlib.decompose.cache import decompose_dataset
from cartlib.decompose.hierarchy import base_detail
from cartlib.io import process_state


# ------------------------------------------------------------------------------------- sources
class ItemSource(Dataset):
    """A registry dataset read per :class:`~cartlib.data.augment.Crop` request.

    ``source[req]`` -> (uint8 (3, R, R), label, index); ``batch(reqs)`` the stacked batch.
    """

    def __init__(self, dataset, resolution: int, mid_ratio: float = 1.0):
        self.dataset, self.resolution, self.mid_ratio = dataset, resolution, mid_ratio
        mid = mid_size(resolution, mid_ratio)
        self.key = dataset.key if mid == resolution else f"{dataset.key}-mid{mid}"
        self.classes, self.num_classes = dataset.classes, dataset.num_classes
        # in memory at R x R and nothing to resize: a batch is a gather (+ mirrors)
        self.fast = isinstance(dataset, ArrayDataset) and not dataset.lazy and mid == resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, req: Crop) -> tuple[torch.Tensor, int, int]:
        ds, r, m = self.dataset, self.resolution, self.mid_ratio
        if isinstance(ds, ImageFolderDataset):
            arr, label = ds.read(req.index, lambda path: read_image(path, r, m, req))
            return torch.from_numpy(arr.copy()).permute(2, 0, 1), label, req.index
        if isinstance(ds, ArrayDataset):
            x, label = ds.images[req.index], int(ds.labels[req.index])
            x = resize_uint8(x[None], r)[0] if ds.lazy else x
        else:  # any other Dataset of (float image in [0, 1], label)
            image, label = ds[req.index]
            x = (image * 255).round().clamp(0, 255).to(torch.uint8)
        return crop_tensor(x, r, m, req).expand(3, -1, -1).contiguous(), label, req.index

    def batch(self, reqs: list[Crop]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The requests as one batch: (uint8 (B, 3, R, R), labels (B,), indices (B,))."""
        idx = torch.tensor([q.index for q in reqs], dtype=torch.long)
        if not self.fast:
            items = [self[q] for q in reqs]
            x = torch.stack([t[0] for t in items])
            return x, torch.tensor([t[1] for t in items], dtype=torch.long), idx
        x = self.dataset.images[idx]  # (B, C, R, R) uint8
        flip = torch.tensor([q.flip for q in reqs])
        if flip.any():
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.expand(-1, 3, -1, -1).contiguous(), self.dataset.labels[idx], idx


def source_for(cfg: DataConfig, split: str = "train", progress: bool = True) -> ItemSource:
    """The :class:`ItemSource` of a config's dataset split (files are listed, not decoded)."""
    dataset = load_dataset_from_config(cfg, split, progress=progress)
    return ItemSource(dataset, cfg.resolution, cfg.mid_ratio)


# ------------------------------------------------------------------------------------ sampling
class StepSampler:
    """The requests of every training step, derived from ``seed`` alone: step s takes items
    ``perm_e[i*B:(i+1)*B]`` of the epoch-e permutation (e, i = divmod(s, N // B)), crops and
    mirrors drawn from (seed, s); a process gets the slice ``[rank::world]``."""

    def __init__(self, n_items, batch_size, seed, rank=0, world=1, random_crop=False, hflip=False):
        if n_items < batch_size:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {n_items} training items; "
                "lower batch_size or use more data (data.train_limit)"
            )
        self.n, self.bs, self.seed, self.rank, self.world = n_items, batch_size, seed, rank, world
        self.random_crop, self.hflip = random_crop, hflip
        self._perm_epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of ``step`` (B,) (all processes)."""
        epoch, i = divmod(step, self.n // self.bs)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[i * self.bs : (i + 1) * self.bs]

    def local_indices(self, step: int) -> torch.Tensor:
        """This process's slice of the global batch of ``step``."""
        return self.indices(step)[self.rank :: self.world]

    def generator(self, step: int) -> torch.Generator:
        """The generator of step ``step``'s per-item draws (crops, mirrors, views)."""
        return torch.Generator().manual_seed(hash_seed(self.seed, step))

    def requests(self, step: int) -> list[Crop]:
        """This process's requests of ``step``."""
        reqs = draw(self.indices(step), self.generator(step), self.random_crop, self.hflip)
        return reqs[self.rank :: self.world]


def batches(
    source: ItemSource, request_batches: Iterable[list[Crop]], workers: int = 0, pin: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(uint8 images, labels, indices) for each list of requests, in order: read by ``workers``
    DataLoader processes (pinned memory when ``pin``), or in this process when 0."""
    if workers == 0:
        yield from (source.batch(reqs) for reqs in request_batches)
        return
    loader = DataLoader(
        source, batch_sampler=request_batches, num_workers=workers, pin_memory=pin,
        prefetch_factor=4,
    )  # fmt: skip
    yield from loader


class _Steps(torch.utils.data.Sampler):
    def __init__(self, sampler: StepSampler, start: int, end: int):
        self.sampler, self.start, self.end = sampler, start, end

    def __iter__(self):
        return (self.sampler.requests(s) for s in range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


class StepStream:
    """``stream(step)`` -> (images float (b, 3, R, R) in [0, 1] on ``device``, labels (b,) on
    ``device``, item indices (b,) on the CPU): this process's share of step ``step``'s batch.

    Steps are read ahead in order by the DataLoader; asking for another step than the next one
    (a resume) restarts the reading there."""

    def __init__(self, source, sampler: StepSampler, device, total_steps: int, workers: int = 0):
        self.source, self.sampler, self.device = source, sampler, torch.device(device)
        self.total, self.workers = total_steps, workers
        self._it, self._next = None, None

    def __call__(self, step: int):
        if self._it is None or step != self._next:
            self.close()
            pin = self.device.type == "cuda"
            self._it = batches(
                self.source, _Steps(self.sampler, step, self.total), self.workers, pin
            )
        x, y, idx = next(self._it)
        self._next = step + 1
        x = x.to(self.device, non_blocking=True).float().div_(255)
        return x, y.to(self.device, non_blocking=True), idx

    def close(self) -> None:
        """Stop the workers (also done when the stream is garbage-collected)."""
        if self._it is not None:
            self._it.close()
            self._it = None


# --------------------------------------------------------------------------------------- bases
class Prefetch:
    """``fn(step)`` with ``fn(step + 1)`` read in a background thread while step ``step`` trains
    (the transformer's token rows: memory-mapped pages come from disk while the GPU computes).
    ``fn`` must be a pure function of the step (as the step sampler makes it), so a prefetched
    result is the one a direct call gives; asked out of order (a resume) it calls ``fn``
    directly. An error of a prefetched read is raised when its step is asked for."""

    def __init__(self, fn, total_steps: int):
        self.fn, self.total = fn, total_steps
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="cartlib-prefetch")
        self.pending = None  # (step, future)

    def __call__(self, step: int):
        ahead, self.pending = self.pending, None
        if ahead is not None and ahead[0] == step:
            out = ahead[1].result()
        else:
            if ahead is not None:  # one read at a time: the unused one finishes first
                wait([ahead[1]])
            out = self.fn(step)
        if step + 1 < self.total:
            self.pending = (step + 1, self.pool.submit(self.fn, step + 1))
        return out

    def close(self) -> None:
        self.pending = None
        self.pool.shutdown(wait=True, cancel_futures=True)


class _CentreImages(Dataset):
    """The centre crops of a source as (float image, label): what the bases cache holds."""

    def __init__(self, source: ItemSource):
        self.source, self.key = source, source.key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        x, label, _ = self.source[centre(i)]
        return x.float().div_(255), label


def stored_order(cfg) -> int:
    """How many bases the data path supplies: the Mumford-Shah hierarchy's n; none for the
    intrinsic and specular factorisations, closed forms the tokenizer computes per batch."""
    return cfg.order if cfg.decompose.kind == "base_detail" else 0


class Bases:
    """B_1..B_n of a batch (Eq. 6), from the switch ``data.cache_bases``: the on-disk cache
    (looked up by item index) or computed on the batch's device. ``bases(x, idx)`` -> float
    (b, n, 3, R, R) on x's device, or None at order 0."""

    def __init__(self, cfg, source: ItemSource, device=None, progress: bool = True):
        d, self.order, self.cache = cfg.decompose, stored_order(cfg), None
        self.params = {"alpha": d.alpha, "lam": d.lam, "eps": d.eps}
        if self.order and cfg.data.cache_bases:
            if cfg.data.random_crop or cfg.data.hflip:
                raise ConfigError(
                    "data.cache_bases=True holds the bases of the centre crops, but "
                    f"random_crop={cfg.data.random_crop}, hflip={cfg.data.hflip} change the "
                    "images every step: set data.cache_bases=False (decomposed per batch on the "
                    "training device) or switch the augmentation off"
                )
            with process_state().main_process_first():  # computed once, then loaded
                self.cache = decompose_dataset(
                    _CentreImages(source), self.order, **self.params, device=device,
                    progress=progress,
                )  # fmt: skip

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        if not self.order:
            return None
        if self.cache is not None:
            return self.cache[idx].to(x.device, non_blocking=True).float()
        with torch.no_grad():
            return torch.stack(base_detail(x.float(), self.order, **self.params).bases, 1)
