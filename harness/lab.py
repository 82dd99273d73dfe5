"""A lab directory: labrat.toml, program.md (the agent's instructions), the ledger and logs."""

from __future__ import annotations

import json
from pathlib import Path

from harness.config import CONFIG_FILE, ConfigError, LabConfig
from harness.ledger import Ledger

LEDGER_FILE = "ledger.db"
PROGRAM_FILE = "program.md"
PROGRAM = """# Research program

You are improving `trainer/train.py`, a small byte-level GPT, to lower **val_bpb** (bits per byte on
held-out text) within a fixed wall-clock training budget. Lower is better.

- Edit only `trainer/train.py`. `trainer/prepare.py` and `trainer/evaluate.py` are fixed: the metric is
  computed by the harness's own copy of the evaluator, never from anything you print.
- Each `run_experiment` trains your current `train.py` for the lab's time budget and evaluates it.
  An improvement is kept; anything else is discarded and the workspace returns to the best version.
- The model must stay causal (position t may use tokens 0..t only): a model that looks ahead is rejected.
- Prefer simple changes with a clear hypothesis, one at a time: learning rate and schedule, width and
  depth, batch size, optimizer settings, architecture details.
"""


def _toml_value(value) -> str:
    # labrat.toml holds scalars only: json's quoting of strings is valid TOML.
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def init_lab(path: Path) -> Path:
    """Create a lab at `path` (or refuse one that already exists). Returns the config file."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if config_file.exists():
        raise ConfigError(f"{config_file} already exists: this is a lab already (edit it, or pick another directory)")
    path.mkdir(parents=True, exist_ok=True)
    lines = ["# labrat lab configuration: every key is optional; these are the defaults."]
    for name, field in LabConfig.model_fields.items():
        default = field.get_default()
        if field.description:
            lines.append(f"# {field.description}")
        lines.append(f"{name} = {_toml_value(default)}" if default is not None else f"# {name} =")
    config_file.write_text("\n".join(lines) + "\n")
    program = path / PROGRAM_FILE
    if not program.exists():
        program.write_text(PROGRAM)
    Ledger(path / LEDGER_FILE).close()
    return config_file


def ensure_lab(path: Path) -> None:
    """Make `path` a lab with the default settings if it is not one yet."""
    if not (Path(path) / CONFIG_FILE).exists():
        init_lab(path)


def read_program(path: Path) -> str:
    """The lab's research instructions (program.md), or the default ones if the file was removed."""
    program = Path(path) / PROGRAM_FILE
    return program.read_text() if program.exists() else PROGRAM
