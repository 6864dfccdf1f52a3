# scaleforge: `make demo` trains the embedded default, `make test` runs the suite.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# every extra (serve, export, stream, search, data, federated, bench) and the test tools; the core alone: tests/lean_install.sh
EXTRAS ?= all,dev
comma := ,
STAMP := $(VENV)/.setup-$(subst $(comma),-,$(EXTRAS))
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup demo test test-fast lint bench support-matrix gpu-check clean

setup: $(STAMP)

# Re-runs only when the project's requirements change, so a second `make setup` takes seconds.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

# Trains the embedded default into runs/demo-<time>, then draws its curves into that run's curves/ folder.
demo: setup
	run=runs/demo-$$(date +%Y%m%d-%H%M%S) && $(BIN)/scaleforge train --run-dir $$run && $(BIN)/scaleforge plot $$run

test: setup
	$(BIN)/python -m pytest -n 2 -q

# The tests not marked slow (end-to-end runs of more than a few seconds), for quick iterations.
test-fast: setup
	$(BIN)/python -m pytest -n 2 -q -m "not slow"

# Style, formatting, and strict types on the foundation, the run-directory format and the public API
# ([tool.mypy] in pyproject.toml names the files).
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

bench: setup
	$(BIN)/scaleforge bench overhead

# Every strategy x compile x checkpointing x precision cell and the strategies compression's training runs under
# (about 20 minutes on 2 cores), then the tables.
support-matrix: setup
	rm -rf .support-matrix
	export SCALEFORGE_MATRIX=all SCALEFORGE_MATRIX_DIR=.support-matrix; status=0; \
	$(BIN)/python -m pytest -n 2 -q tests/integration/test_support_matrix.py tests/integration/test_distributed.py \
		|| status=1; \
	$(BIN)/python -m pytest -n 2 -q tests/integration/test_compress.py -k "qat or quantization_aware or distill" \
		|| status=1; \
	$(BIN)/python -m tests.support_matrix .support-matrix docs/support-matrix.md; exit $$status

# The checks that need a GPU (scaleforge.bench.gpu_check): trainings, resume, checkpoints, benchmarks and a 1B gpt
# on CUDA, their figures printed and written to gpu-check/gpu-check.json as they come. For a machine with CUDA whose
# Python already holds PyTorch and the core requirements: it runs from the source tree, with no setup (and no
# package index). Without a GPU it says so and exits 0.
gpu-check:
	PYTHONPATH=src $${PYTHON:-python3} -m scaleforge.bench.gpu_check

clean:
	rm -rf $(VENV) runs .pytest_cache
