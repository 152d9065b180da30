# napari-xt: the two commands a newcomer needs are `make demo` and `make test`.
# Both set everything up themselves (virtual env with pinned dev torch, display packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/dev.txt
STAMP := $(VENV)/.installed

.PHONY: setup display test lint demo bench clean

setup: $(STAMP) display

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, pinned, so nothing below can pull an unpinned (multi-GB) build
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[test]'
	@touch $@

display:
	@bash scripts/ensure_display_deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check napari_xt tests benchmarks

test: setup lint
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/napari-xt demo $(DEMO_ARGS)

bench: setup
	$(VENV)/bin/napari-xt bench

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
