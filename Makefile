# Two commands do all the set-up on a fresh machine:
#   make demo   -- create .venv if missing, install, run the quickstart sweep
#   make test   -- same set-up, then the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.greensweep-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip 'setuptools>=77'
	$(PY) -m pip install -e '.[dev,runtimes]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/greensweep run examples/quickstart.yaml

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .greensweep .pytest_cache
