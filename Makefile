# Two commands for a fresh machine: `make demo` (the main job on the embedded defaults) and `make test`.
# Both are idempotent: each step installs only what is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO_LAB ?= demo-lab

.PHONY: demo test test-tools setup engine venv image bench clean-images

# An offline session (no key, CPU, synthetic data) of a few experiments; prints the results table.
# Run it again to continue from the best result so far.
demo: setup
	$(BIN)/labrat run --lab $(DEMO_LAB) --max-experiments 4 --budget 30

test: setup test-tools
	$(BIN)/pytest

# Chromium, for the HTML report's browser test.
test-tools:
	@bash scripts/setup-test-tools.sh

setup: engine venv image

engine:
	@bash scripts/setup-host.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "labrat setup: Python >= 3.11 is needed (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[torch,test]'
	@touch $@

image: engine venv
	$(BIN)/labrat image build

bench: setup
	$(BIN)/python bench/sandbox.py
