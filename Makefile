# `make demo` and `make test` bootstrap .venv themselves (python3 -m venv + pip install -e .[test]
# constrained to the tested versions in requirements/lock.txt) whenever it is missing or older
# than pyproject.toml or the lock. `make lock` upgrades every package within pyproject.toml's
# ranges and rewrites the lock (then run `make test` and commit the lock if it passes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt

.PHONY: demo test test-fast bench lint lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[test]" --config-settings editable_mode=compat
	touch $(STAMP)

lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
	mkdir -p $(dir $(LOCK))
	{ echo "# Constraints of the tested environment (Python $$($(BIN)/python -c 'import platform; print(platform.python_version())'), $$(uname -sm))."; \
	  echo "# \`make demo\` / \`make test\` install with \`pip install -c $(LOCK) -e .[test]\`;"; \
	  echo "# \`make lock\` upgrades every package within pyproject.toml's ranges and rewrites this file."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/stability sweep --sweep=sweeps/demo.py --workdir=runs/demo

# One pytest worker per core (pytest-xdist; a test file stays on one worker, so its module
# fixtures are built once).
TEST_WORKERS ?= auto
test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/sweep.py

lint: $(STAMP)
	$(BIN)/ruff check stability tests benchmarks sweeps configs notebooks
	$(BIN)/ruff format --check stability tests benchmarks sweeps configs notebooks

clean:
	rm -rf $(VENV) runs .pytest_cache
