"""Build the site of the executed series (``make book``): the committed executed copies
(``papermill_runs/defaults``) and the docs, laid out as in the repository so that their relative
links resolve, rendered by Jupyter Book 1 with execution off: nothing runs, nothing is fetched.

    python docs/book/build.py [OUT]     (default: _build/book; the site: OUT/_build/html)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def build(out: Path, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Copy the pages into ``out/src`` and build them into ``out``; ``prefix``: a command to
    run the build under (tests: ``unshare -rn``, no network)."""
    src = out / "src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "notebooks").mkdir(parents=True)
    (src / "docs").mkdir()
    for name in ("_config.yml", "_toc.yml", "intro.md"):
        shutil.copy(ROOT / "docs" / "book" / name, src)
    for nb in sorted((ROOT / "papermill_runs" / "defaults").glob("[0-9][0-9]_*.ipynb")):
        shutil.copy(nb, src / "notebooks")
    for pattern in ("*.md", "*.png", "*.jpg"):
        for doc in (ROOT / "docs").glob(pattern):
            shutil.copy(doc, src / "docs")
    book = Path(sys.executable).with_name("jupyter-book")
    cmd = [*(prefix or []), str(book), "build", "--path-output", str(out), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "_build" / "book")
    done = build(out)
    print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
    if done.returncode == 0:
        print(f"open {out / '_build' / 'html' / 'index.html'}")
    sys.exit(done.returncode)
