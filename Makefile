# Every target works from a fresh clone on a machine that has only Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
# Override for another torch build, e.g. make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moesafe-installed

.PHONY: setup test quickstart figures bench clean

setup: $(STAMP)

# Re-installs only when the project's requirements change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=30

# Results go to results/, the default --out of `moesafe status` and `moesafe query`.
quickstart: setup
	$(VENV)/bin/moesafe sandbox
	$(VENV)/bin/moesafe run manifests/quickstart.yaml --out results
	$(VENV)/bin/moesafe report --out results

# Rewrites README.md's sandbox figures from the cached build, and its quickstart and "Beyond the papers"
# figures from their runs in results/ (running them if needed).
figures: setup
	$(PY) benchmarks/sandbox_figures.py
	$(PY) benchmarks/readme_figures.py --out results --run
	$(PY) benchmarks/beyond_figures.py --out results --run

bench: setup
	$(PY) benchmarks/fsour_bench.py

clean:
	rm -rf $(VENV) .cache
