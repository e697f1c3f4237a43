# `make demo` and `make test` install everything into .venv/ first (scripts/install.sh).
VENV := .venv
PY := $(VENV)/bin/python
DEMO ?= tiny

.PHONY: install demo test bench clean-runs
install:
	bash scripts/install.sh

demo: install
	$(VENV)/bin/pmc demo $(DEMO)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(VENV)/bin/pmc bench

clean-runs:
	rm -rf runs
