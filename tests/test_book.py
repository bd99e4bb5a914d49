"""The rendered site of the executed series (issue 36): ``make book`` (docs/book/build.py)
builds it offline from the committed executed copies — here without any network at all, when
this machine lets a test drop it (a user namespace without network interfaces)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("book_build", ROOT / "docs/book/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_executed_series_builds_as_a_site_offline(tmp_path):
    if not Path(sys.executable).with_name("jupyter-book").exists():
        pytest.skip("jupyter-book is not installed (make install installs the dev extra)")
    no_network = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    done = _builder().build(tmp_path, ["unshare", "-rn"] if no_network else None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    html = tmp_path / "_build" / "html"
    pages = {p.stem for p in (html / "notebooks").glob("*.html")}
    executed = {p.stem for p in (ROOT / "papermill_runs" / "defaults").glob("[0-9]*.ipynb")}
    assert pages == executed and len(pages) == 9
    assert (html / "index.html").is_file() and (html / "docs" / "results.html").is_file()
    assert len(list((html / "_images").glob("*"))) > 20  # the executed figures are on the pages
