"""Token shards: the extracted token sequences of a dataset split, memory-mapped from disk.

A folder ``<tokenizer dir>/tokens-<split>/`` holds, for shard k of ``shard_size`` images:

- ``shard-0000k.npy``: uint16 (n_k, views, L), the flattened token maps r_1..r_M (Alg. 1) of
  every view of every image, row order = image order (a numpy ``.npy``: memory-mappable);
- ``shard-0000k.labels.npy``: int32 (n_k,), the class labels;
- ``shard-0000k.json``: what the shard holds (first image, count, views, L, schedule, tokenizer
  hash, the sha256 of its two files); written last, so a shard without it is unfinished and is
  encoded again on resume;

and ``manifest.json`` (schedule, tokenizer hash, counts, the shard list with the checksums) once
every shard is done.

Design decisions:

- **uint16**: codebooks up to 65,536 codes (the paper: 4,096); 2 bytes per token, so ImageNet at
  256 px (2,066 tokens per image) is 5.3 GB per view, read a batch of rows at a time.
- **Checked on load**: every shard's size against its header and its record, its tokenizer hash
  against the manifest's (and the tokenizer in use), its count against the manifest, and its
  files against the sha256 recorded when they were written (a bit flip in a token that stays
  inside the codebook is otherwise undetectable). A bad shard is an error naming the shard and
  the command that rebuilds it; nothing is deleted.
- **Hashed once per process**: sha256 runs at ~1.8 GB/s on a core with SHA extensions (~0.5 GB/s
  without), so ImageNet's 5.3 GB per view costs seconds. A digest is kept in memory keyed by the
  file's inode, size, mtime and ctime (:func:`file_sha256`): re-opening the shards in the same
  process (a notebook, ``ensure_tokens`` after extraction) hashes nothing again, and a file
  written since (any write moves mtime/ctime) is hashed anew. The writer hashes each file once
  when it finishes it. Shards written before checksums were recorded are checked without them.
- **Per-shard resume**: files are written under a temporary name and renamed, the record last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cartlib.data.augment import CENTRE_MIRROR_CROPS  # the rule of shards that do not say
from cartlib.io import atomic_write_bytes, disk_full_error, reserve, sha256_file

SHARD_FORMAT = 1
MANIFEST = "manifest.json"
TOKEN_DTYPE = np.uint16


class ShardError(RuntimeError):
    """A token shard is missing, truncated or from another tokenizer; the message names it and
    the command that rebuilds it."""


def tokenizer_hash(tokenizer) -> str:
    """A short hash of a tokenizer's weights: tokens extracted with it carry it."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


_DIGESTS: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat key, sha256), this process


def _stat_key(path: Path) -> tuple[int, ...]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of ``path``, hashed at most once per process while the file is unchanged (same
    inode, size, mtime and ctime: see the module docstring)."""
    path = Path(path).absolute()
    key = _stat_key(path)
    cached = _DIGESTS.get(str(path))
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = sha256_file(path)
    _DIGESTS[str(path)] = (key, digest)
    return digest


def _remember(path: Path, digest: str) -> None:
    """Record the digest a writer computed for ``path`` (then renamed into place)."""
    path = path.absolute()
    _DIGESTS[str(path)] = (_stat_key(path), digest)


def shard_folder(tokenizer_dir: str | os.PathLike, split: str) -> Path:
    return Path(tokenizer_dir) / f"tokens-{split}"


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first image
    count: int  # images

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def paths(self, folder: Path) -> tuple[Path, Path, Path]:
        """(tokens .npy, labels .npy, record .json)."""
        return (folder / f"{self.name}.npy", folder / f"{self.name}.labels.npy",
                folder / f"{self.name}.json")  # fmt: skip


def plan_shards(n_images: int, shard_size: int) -> list[Shard]:
    """Consecutive shards of ``shard_size`` images (the last one shorter)."""
    if shard_size < 1:
        raise ValueError(f"data.shard_size={shard_size} must be a positive number of images")
    return [Shard(k, s, min(shard_size, n_images - s))
            for k, s in enumerate(range(0, n_images, shard_size))]  # fmt: skip


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header bytes) of a .npy file, without reading its data."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version not in readers:
            raise ValueError(f".npy format version {version} is not one numpy writes for shards")
        shape, _, dtype = readers[version](f)
        return shape, dtype, f.tell()


def check_shard(folder: Path, shard: Shard, expect: dict) -> str | None:
    """Why shard ``shard`` is not a finished shard holding ``expect`` (tokenizer, views, seq_len),
    "missing" when it was never finished, or None when it is good."""
    tokens, labels, record = shard.paths(folder)
    if not record.exists():
        return "missing"
    try:
        rec = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return f"its record {record.name} cannot be read ({e})"
    if rec.get("tokenizer") != expect["tokenizer"]:
        return (f"it was extracted with another tokenizer (hash {rec.get('tokenizer')}, this one "
                f"is {expect['tokenizer']})")  # fmt: skip
    for k, what in (("dataset", "dataset"), ("items", "list of images"),
                    ("identity", "images (names, sizes or times)")):  # fmt: skip
        if k in rec and k in expect and rec[k] != expect[k]:  # (older records lack some)
            return Stale(
                f"the {what} changed since it was extracted ({rec[k]}, now {expect[k]}): its "
                "rows encode other images than the data holds now"
            )
    want = {
        "start": shard.start,
        "count": shard.count,
        **{k: expect[k] for k in ("views", "seq_len")},
        "views_are": expect.get("views_are", CENTRE_MIRROR_CROPS),
    }
    got = {k: rec.get(k, CENTRE_MIRROR_CROPS if k == "views_are" else None) for k in want}
    if got != want:
        return f"its record says {got}, expected {want}"
    shape = (shard.count, expect["views"], expect["seq_len"])
    for path, want_shape, dtype in ((tokens, shape, TOKEN_DTYPE), (labels, shape[:1], np.int32)):
        if not path.exists():
            return f"{path.name} is missing"
        try:
            got_shape, got_dtype, header = _npy_header(path)
        except (OSError, ValueError) as e:
            return f"{path.name} is not a readable .npy file ({e})"
        if got_shape != want_shape or got_dtype != np.dtype(dtype):
            want_what = f"{np.dtype(dtype)} {want_shape}"
            return f"{path.name} holds {got_dtype} {got_shape}, expected {want_what}"
        size, need = (
            path.stat().st_size,
            header + int(np.prod(want_shape)) * np.dtype(dtype).itemsize,
        )
        if size != need:
            return f"{path.name} is truncated ({size} of {need} bytes)"
    return _digest_problem(folder, shard, rec.get("sha256"), expect.get("sha256"))


def _digest_problem(folder: Path, shard: Shard, recorded, listed) -> str | None:
    """Why the files of ``shard`` do not match the sha256 its record holds (and the manifest
    lists, when given), or None. Records written before checksums existed hold none."""
    if listed is not None and listed != recorded:
        return (f"its record's checksums differ from those {MANIFEST} lists for it (the record "
                "was replaced or edited)")  # fmt: skip
    if recorded is None:
        return None
    tokens, labels, _ = shard.paths(folder)
    for path, what in ((tokens, "tokens"), (labels, "labels")):
        if file_sha256(path) != recorded[what]:
            return (f"{path.name} is not the file that was written: its sha256 differs from the "
                    "one recorded at extraction (corrupted on disk, or edited)")  # fmt: skip
    return None


class Stale(str):
    """A reason why a shard is unusable that holds for the whole folder (the data changed since
    extraction): every shard is rebuilt, not this one."""


def stale_error(folder: Path, reason: str, rebuild: str) -> ShardError:
    """The data changed since the shards of ``folder`` were extracted: rebuild them all (one
    command, quoted for the shell)."""
    return ShardError(
        f"the token shards in {folder} are stale: {reason}. Training on them would learn images "
        f"that are no longer there. Rebuild them all:\n  rm -r {shlex.quote(str(folder))} && "
        f"{rebuild}"
    )


def shard_error(folder: Path, shard: Shard, reason: str, rebuild: str) -> ShardError:
    """Shard ``shard`` is unusable for ``reason``: re-encode the bad ones (one command for them
    all: ``extract-tokens --redo-bad`` re-encodes every shard that fails its checks and keeps
    the others), or, for :class:`Stale` reasons, rebuild the folder."""
    if isinstance(reason, Stale):
        return stale_error(folder, reason, rebuild)
    return ShardError(
        f"token shard {folder / shard.name}.npy is unusable: {reason}. Re-encode every bad shard "
        f"(the good ones are kept):\n  {rebuild} --redo-bad"
    )


class ShardWriter:
    """Writes one shard: ``write(row, tokens (b, L))`` fills views in row order (row = image *
    views + view), ``finish(labels)`` renames the files into place, the record last."""

    def __init__(self, folder: Path, shard: Shard, meta: dict):
        self.folder, self.shard, self.meta = folder, shard, meta
        self.paths = shard.paths(folder)
        self._tmp = self.paths[0].with_name(f".{self.shard.name}.npy.tmp")
        shape = (shard.count, meta["views"], meta["seq_len"])
        self.array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=TOKEN_DTYPE, shape=shape)
        reserve(self._tmp, self._tmp.stat().st_size)  # a full disk: an error now, not a SIGBUS
        self.flat = self.array.reshape(-1, meta["seq_len"])  # (count * views, L), a view

    def write(self, row: int, tokens: np.ndarray) -> None:
        self.flat[row : row + len(tokens)] = tokens

    def finish(self, labels: np.ndarray) -> None:
        self.array.flush()
        del self.flat, self.array
        tokens = sha256_file(self._tmp)
        os.replace(self._tmp, self.paths[0])
        _remember(self.paths[0], tokens)
        tmp = self.paths[1].with_name(f".{self.shard.name}.labels.npy.tmp")
        labels = labels.astype(np.int32)
        try:
            with open(tmp, "wb") as f:
                np.save(f, labels)
        except OSError as e:  # a full disk: named with the folder and the size, no temp file
            tmp.unlink(missing_ok=True)
            raise (disk_full_error(e, tmp, labels.nbytes + 128) or e) from e
        labels_sha = sha256_file(tmp)
        os.replace(tmp, self.paths[1])
        _remember(self.paths[1], labels_sha)
        record = {**self.meta, "start": self.shard.start, "count": self.shard.count,
                  "sha256": {"tokens": tokens, "labels": labels_sha}}  # fmt: skip
        atomic_write_bytes(self.paths[2], json.dumps(record, indent=1).encode())


def write_manifest(folder: Path, shards: list[Shard], meta: dict) -> None:
    """The manifest of finished (checked) ``shards``: ``meta`` and the shard list, each entry
    with the checksums its record holds."""
    entries = []
    for s in shards:
        entry = {"name": s.name, "start": s.start, "count": s.count}
        digests = json.loads(s.paths(folder)[2].read_text()).get("sha256")
        entries.append(entry if digests is None else {**entry, "sha256": digests})
    manifest = {
        **meta,
        "format": SHARD_FORMAT,
        "num_images": sum(s.count for s in shards),
        "shards": entries,
    }
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


class TokenShards:
    """The token shards of a folder, checked and memory-mapped (nothing is read until asked).

    ``rows(idx, view)`` -> int64 (b, L): the sequences of images ``idx`` (b,) in views ``view``
    (b,); ``labels`` int64 (N,); ``num_classes``, ``views``, ``seq_len``, ``len()`` = images.
    ``tokenizer``: the hash the shards must carry (None: the manifest's); ``rebuild``: the command
    an error message gives to rebuild a bad shard; ``identity``: the data's identity now
    (``dataset.identity()``; None: not checked, e.g. the images are not on this machine)."""

    def __init__(
        self,
        folder: str | os.PathLike,
        tokenizer: str | None = None,
        rebuild: str = "",
        identity: str | None = None,
    ):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            raise ShardError(f"{path} is missing: the tokens of this split were not extracted "
                             f"(or not to the end); run:\n  {rebuild}")  # fmt: skip
        self.manifest = m = json.loads(path.read_text())
        self.views, self.seq_len, self.num_classes = m["views"], m["seq_len"], m["num_classes"]
        self.shards = [Shard(k, s["start"], s["count"]) for k, s in enumerate(m["shards"])]
        self.shard_size = self.shards[0].count if self.shards else 1
        if tokenizer is not None and m["tokenizer"] != tokenizer:
            raise ShardError(
                f"the tokens in {self.folder} were extracted with another tokenizer (hash "
                f"{m['tokenizer']}; this one is {tokenizer}): every shard must be rebuilt:\n"
                f"  rm -r {shlex.quote(str(self.folder))} && {rebuild}"
            )
        if identity is not None and m.get("identity", identity) != identity:  # (older: none)
            reason = (f"the images changed since extraction (identity {m['identity']}, the data "
                      f"holds {identity} now: a file added, removed or rewritten)")  # fmt: skip
            raise stale_error(self.folder, reason, rebuild)
        arrays, labels = [], []
        for shard, entry in zip(self.shards, m["shards"], strict=True):
            expect = {**m, "sha256": entry.get("sha256")}
            reason = check_shard(self.folder, shard, expect)
            if reason is not None:
                raise shard_error(self.folder, shard, reason, rebuild)
            tokens_path, labels_path, _ = shard.paths(self.folder)
            arrays.append(np.load(tokens_path, mmap_mode="r"))
            labels.append(np.load(labels_path))
        self._arrays = arrays
        self.labels = torch.from_numpy(np.concatenate(labels).astype(np.int64))
        self.codebook_size = m.get("codebook_size")
        bad = (self.labels < 0) | (self.labels >= self.num_classes)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            shard = self.shards[i // self.shard_size]
            raise shard_error(
                self.folder, shard, f"label {int(self.labels[i])} of image {i} is not one of "
                f"the {self.num_classes} classes (a damaged file)", rebuild,
            )  # fmt: skip
        self.rebuild = rebuild

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Token sequences of images ``idx`` in views ``view``, read from the shards. (b, L)"""
        idx, view = idx.numpy(), view.numpy()
        out = np.empty((len(idx), self.seq_len), dtype=TOKEN_DTYPE)
        shard, local = np.divmod(idx, self.shard_size)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = read = self._arrays[k][local[sel], view[sel]]
            if self.codebook_size is not None and read.max() >= self.codebook_size:
                reason = (f"it holds token {int(read.max())}, beyond the codebook's "
                          f"{self.codebook_size} codes (a damaged file)")  # fmt: skip
                raise shard_error(self.folder, self.shards[k], reason, self.rebuild)
        return torch.from_numpy(out.astype(np.int64))
