"""List and header-check an image folder in every process of a launch and report what each did.

Used by tests/test_data_scale.py under ``accelerate launch`` with 2 CPU processes:
``python tests/folder_check_probe.py ROOT OUT``. Each process writes ``OUT/rank<r>.json``
(two processes printing to one pipe interleave their lines): its rank, how many headers it read
itself, and the items and skipped files of the dataset it built.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cartlib.data import folder, load_dataset
from cartlib.io import process_state
from cartlib.launch import leave_process_group


def main(root: str, out: str) -> None:
    state = process_state()  # the launched process group, as every stage starts it
    read = []
    verify = folder._verify
    folder._verify = lambda path: read.append(str(path)) or verify(path)
    ds = load_dataset("imagefolder", "train", 16, root=root, bad_files="skip", progress=False)
    report = json.dumps({
        "rank": state.process_index, "world": state.num_processes, "read": len(read),
        "items": [str(ds.path(i)) for i in range(len(ds))],
        "skipped": [str(p) for p, _ in ds.skipped],
    })  # fmt: skip
    Path(out, f"rank{state.process_index}.json").write_text(report)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
