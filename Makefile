# cartlib — the README's two commands: `make run` and `make test`.
# Both set up .venv on first use (pinned torch, the project in editable mode, the Jupyter kernel
# "cartlib" that papermill and nbval share) and fetch the default dataset when they can.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := cartlib
PRESET ?= tiny
STAMP := $(VENV)/.cartlib-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: run test test-avx2 test-ui check-full lab publish book install data lint format bench clean-runs

run: install data  ## execute the notebook series at $(PRESET) into papermill_runs/$(PRESET)/
	$(PY) -m cartlib run-series --preset $(PRESET)

# Unit tests in $(TEST_WORKERS) processes (pytest-xdist), one torch thread each, a test module's
# tests in one process (its fixtures are built once): on 2 cores 334 s against 475 s for one
# process with two threads (AVX2 simulated, 2026-12-03). TEST_WORKERS=0: one process, as before.
TEST_WORKERS ?= 2
ifeq ($(TEST_WORKERS),0)
UNIT_TESTS := $(PY) -m pytest tests
else
UNIT_TESTS := OMP_NUM_THREADS=1 $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadscope
endif

test: install data  ## unit tests + every notebook at its committed defaults (nbval)
	$(VENV)/bin/lint-imports --no-cache
	$(UNIT_TESTS) $(PYTEST_ARGS)
	$(PY) -m pytest --nbval-lax --nbval-kernel-name $(KERNEL) --nbval-cell-timeout 900 \
		-p no:cacheprovider notebooks $(PYTEST_ARGS)

# The same suite as an AVX2-only CPU (most laptops) runs it, on a CPU with avx512_bf16: torch's
# kernels and oneDNN's capped at AVX2, so bf16 is emulated and `mixed_precision: auto` is fp32.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
test-avx2: install data  ## make test as an AVX2-only CPU runs it
	$(AVX2_ONLY) $(MAKE) test

# A student's walk through 01, 05 and 07 in JupyterLab, driven by headless Chromium (Debian's
# package; Playwright from PyPI drives it, never downloading a browser): open, Run All, edit the
# parameters cell, re-run from there and from the config cell, move a panel's slider. Minutes
# (01 trains nothing but decomposes for about a minute); not part of `test`.
test-ui: install data  ## browser walk-through of notebooks 01, 05, 07 in JupyterLab
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet -e '.[ui]'
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; \
	fi
	$(PY) -m pytest tests/ui -p no:cacheprovider $(PYTEST_ARGS)

# Every stage of cart-d16-256 and var-d16-256 at full shape (256², VAR's VQ-VAE, d16), 2 steps
# each, on the CPU; then notebooks 05 and 07 draw Fig. 3, 5, 10 and Table 1's row from those runs; the
# deeper presets on the meta device. About 45 min and ~15 GB of RAM: not in `test`.
check-full: install data  ## full-shape smoke of the full-scale presets and the paper items (CPU, ~45 min)
	$(PY) tests/check_full_shape.py

lab: install data  ## open the notebooks in JupyterLab (kernel "cartlib"); runs nothing itself
	$(VENV)/bin/jupyter lab notebooks

# The executed copies a reader opens on the repository page: every notebook at its committed
# defaults into papermill_runs/defaults/ (committed; tests check they match notebooks/).
publish: install data  ## execute every notebook at its defaults into papermill_runs/defaults/
	$(PY) -m cartlib run-series --preset defaults

# The executed series as a static site (Jupyter Book 1: Sphinx + MyST-NB), built offline from
# the copies `make publish` commits: nothing is executed or fetched (tests/test_book.py builds it
# without a network). Open _build/book/_build/html/index.html.
BOOK := _build/book
book: install  ## the notebooks executed at their defaults as a site, in _build/book
	$(PY) docs/book/build.py $(BOOK)

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1 -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (cartlib)"
	touch $@

# Fashion-MNIST comes from Debian's dataset-fashion-mnist when apt can install it (CI runs as root);
# otherwise set CART_DATA_DIR or be online (torchvision download). `cartlib check-data` says which.
data: install
	@if [ ! -e $(FMNIST) ] && [ -z "$$CART_DATA_DIR" ] && command -v apt-get >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
			>/dev/null 2>&1 || echo "note: could not apt-get install dataset-fashion-mnist"; \
	fi
	@$(PY) -m cartlib check-data fashion-mnist

lint:
	$(VENV)/bin/ruff check cartlib tests benchmarks notebooks
	$(VENV)/bin/ruff format --check cartlib tests benchmarks

format:
	$(VENV)/bin/ruff format cartlib tests benchmarks
	$(VENV)/bin/ruff check --fix cartlib tests benchmarks

bench: install data  ## throughput figures (never fail on time)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean-runs:
	find papermill_runs -mindepth 2 -maxdepth 2 -name '*.ipynb' -not -path 'papermill_runs/defaults/*' -delete
	rm -rf papermill_runs/*/runs papermill_runs/smoke papermill_runs/shipped
