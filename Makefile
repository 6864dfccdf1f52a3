# scaleforge: `make demo` trains the embedded default, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.setup-$(subst $(comma),-,$(EXTRAS))
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# Re-runs only when the project's requirements change, so a second `make setup` takes seconds.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(BIN)/scaleforge train

test: setup
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: setup
	$(BIN)/scaleforge bench overhead

clean:
	rm -rf $(VENV) runs .pytest_cache
