# `make demo` and `make test` bootstrap .venv themselves (python3 -m venv + pip install -e .[test])
# whenever it is missing or older than pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/stability sweep --sweep=sweeps/demo.py --workdir=runs/demo

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/sweep.py

lint: $(STAMP)
	$(BIN)/ruff check stability tests benchmarks sweeps configs

clean:
	rm -rf $(VENV) runs .pytest_cache
