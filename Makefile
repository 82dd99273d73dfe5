# Two commands for a fresh machine: `make demo` (the main job on the embedded defaults) and `make test`.
# Both are idempotent: each step installs only what is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test setup engine venv image bench clean-images

demo: setup
	$(BIN)/labrat demo

test: setup
	$(BIN)/pytest

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
