"""What every dataset module shares: splits, bad-file policies, errors, argument checks."""

from __future__ import annotations

SPLITS = ("train", "test")
BAD_FILE_POLICIES = ("error", "skip")


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on this machine and could not be downloaded; the message says how to
    get it."""


class BadFileError(RuntimeError):
    """A data file is corrupt or unreadable; the message names it and the fix."""


def _check_args(split: str, resolution: int, limit: int | None, bad_files: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; use one of {', '.join(SPLITS)}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer, e.g. 32")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be a positive integer or None (all items)")
    if bad_files not in BAD_FILE_POLICIES:
        raise ValueError(f"bad_files={bad_files!r} must be 'error' or 'skip'")
