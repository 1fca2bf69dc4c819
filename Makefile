# imgvec: `make demo` and `make test` are the two set-up commands; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-slow docs bench bench-full screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m imgvec.cli.demo demo-out
	@echo
	@echo "imgvec is installed in $(VENV): run '. $(VENV)/bin/activate' to put it on your PATH (README: Quick start)"

# parallel workers (a test file's tests stay on one worker, so its module fixtures are built once), line
# coverage of src/ with subprocesses counted, and a floor under it
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --cov=imgvec --cov-report=term:skip-covered --cov-fail-under=92

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# every table of figures in README.md and docs/, from the registry, benchmarks/results and the CLI
docs: $(STAMP)
	$(BIN)/python -m benchmarks.docs

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run

bench-full: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run --full

# the README's gallery screenshots (headless Chromium)
screenshots: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH docs/screenshots/make.sh

clean:
	rm -rf $(VENV) demo-out .pytest_cache
