"""A lab directory: labrat.toml, program.md (the agent's instructions), the ledger and logs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from harness.config import CONFIG_FILE, NEW_LAB_SETTINGS, ConfigError, LabConfig
from harness.ledger import Experiment, Ledger

LEDGER_FILE = "ledger.db"
LOCK_FILE = ".labrat.lock"
PROGRAM_FILE = "program.md"
COMPILE_CACHE_FILE = "cache/compile.tar"  # the lab's compile cache, when labrat.toml's compile_cache_mb turns it on
PROGRAM = """# Research program

This file is yours, the researcher's: the objective, the search space and the constraints of this lab.
The agent reads it at the start of every session. Edit it freely; the sections below are a template.

## Objective

Lower **val_bpb** (bits per byte on held-out text) of `trainer/train.py`, a small GPT, within a fixed
wall-clock training budget. Lower is better. Its tokens are the lab's: bytes, or BPE ids
(`/data/meta.json` says which, with the vocabulary's size; `/data/tokenizer.json` holds a BPE tokenizer).

## The loop

1. Read `trainer/train.py` and the lab's history (`list_experiments`, `show_experiment`, `diff`).
2. Pick one idea. State it before you run it: `run_experiment` takes a `description` (the change, one
   line), a `hypothesis` (why it should help) and an `expected_delta` (the change of val_bpb you expect
   against the current best; negative is better). Results far from what you expected are marked
   surprising: they are the ones worth a second look.
3. Edit `trainer/train.py` (the editor or bash), then call `run_experiment`.
4. Read the result and the keep rule's reason. A kept change is the new best and the workspace holds it;
   anything else is discarded and the workspace returns to the best version by itself.
5. If it crashed, read the log tail: fix a typo and run again; drop an idea that is broken at its root.
6. Go to 1.

**Never stop to ask.** Do not ask whether to go on or wait for confirmation: the person who set this up
may be asleep and expects you to work until the session's budget ends it. If you run out of ideas,
think harder: combine near-misses, revisit a discarded idea with a different setting, try the opposite
of what failed, simplify.

## What you may change

Only `trainer/train.py`: the model, the optimizer, the schedule, the batch, the loop, and the knobs at
its top. Everything else in `trainer/` is fixed and root-owned, and so is what `trainer/contract.py`
says train.py must provide (`build_model`, the checkpoint's contents, the vocabulary, the context
lengths). You cannot install packages or reach the network.

The budget is **all-in wall clock on the harness's clock**: from the moment the training process
starts to the moment it exits (imports, data loading, compilation, training and saving), the same for
every experiment. train.py is told the deadline (`LABRAT_DEADLINE`, read by
`trainer.prepare.training_deadline`) and is killed there: a run that is still going, or that gives
itself more time, ends as `timeout` and is not scored. Stop stepping early enough to save (the shipped
train.py keeps `SAVE_RESERVE_SECONDS`). Each run's seed is the harness's (`--seed`): use it.

## How results are judged

- The metric is computed by the harness's own copy of the evaluator from the model's log-probabilities,
  never from anything you print.
- The model must stay causal (position t may use tokens 0..t only of its own row, and nothing it
  remembers from other calls): a model that looks ahead is rejected, and so is a score below what any
  model can attain on the data, or non-finite log-probabilities.
- The lab's keep rule decides (in a new lab, `significant`: only a gain beyond the measured noise is
  kept, after training the change again with fresh seeds). A gain smaller than the noise is not a gain.

## Constraints

Set in `labrat.toml`; the harness measures them and discards a run that breaks one, with the reason:
`max_params` (the checkpoint's weights), `max_memory_gb` (the training container's peak memory),
`min_tokens_per_second` (training throughput as train.py reports it). Add your own here in words.

## Simplicity criterion

All else being equal, simpler is better. A tiny gain that adds ugly complexity is not worth keeping; a
change that removes code and scores the same or better is a win. Prefer one change at a time with a
clear hypothesis: learning rate and schedule, width and depth, batch size, optimizer settings,
architecture details.
"""


def write_atomically(path: Path, text: str) -> None:
    """Replace a lab file in one step: a reader (or a harness killed mid-write) sees the old or the new
    contents, never half of them."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


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
    lines = ["# labrat lab configuration: every key is optional; these are a new lab's defaults."]
    for name, field in LabConfig.model_fields.items():
        default = NEW_LAB_SETTINGS.get(name, field.get_default())
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


def lab_compile_cache(path: Path) -> Path:
    return Path(path) / COMPILE_CACHE_FILE


def open_ledger(path: Path) -> Ledger:
    """The ledger of an existing lab, or a one-line error."""
    if not (Path(path) / LEDGER_FILE).exists():
        raise ConfigError(f"{path} is not a lab (no {LEDGER_FILE}): run `labrat init {path}` or pass --lab")
    return Ledger(Path(path) / LEDGER_FILE)


def experiment_or_error(ledger: Ledger, experiment_id: int) -> Experiment:
    try:
        return ledger.experiment(experiment_id)
    except KeyError:
        raise ConfigError(f"no experiment #{experiment_id} in this lab (see `labrat log`)") from None


class LabBusy(ConfigError):
    """Another labrat process holds this lab."""


def lock_lab(path: Path) -> int:
    """Take the lab's exclusive lock (held until the returned fd is closed) or raise LabBusy."""
    Path(path).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(path) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LabBusy(f"another labrat process (pid {holder}) is running in {path}; wait for it or stop it") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


@contextlib.contextmanager
def lab_locked(path: Path) -> Iterator[None]:
    """Hold the lab's exclusive lock for the block (LabBusy if another labrat process holds it)."""
    fd = lock_lab(path)
    try:
        yield
    finally:
        os.close(fd)


def rollback(path: Path, experiment_id: int) -> str:
    """Make experiment_id the starting point of the lab's next experiments. Returns what was done."""
    from sandbox.snapshots import SnapshotStore

    with lab_locked(path), open_ledger(path) as ledger:
        experiment = experiment_or_error(ledger, experiment_id)
        if experiment.status == "running" or not experiment.snapshot:
            raise ConfigError(f"experiment #{experiment_id} has no snapshot to start from ({experiment.status})")
        SnapshotStore().get(experiment.snapshot)  # SnapshotMissing, one line, if it was garbage-collected
        last = ledger.last_session()
        if last is not None and last.resumable:
            ledger.set_base(last.id, experiment_id)
            done = f"session {last.id} continues from #{experiment_id} at the next `labrat run`"
        else:
            ledger.set_meta("next_base", str(experiment_id))
            done = f"the next session starts from #{experiment_id}"
        ledger.record_event(last.id if last else None, "rollback", experiment=experiment_id)
        return done


def gc_lab(path: Path, dry_run: bool = False):
    """Remove the snapshots of discarded and crashed experiments; keep every kept one, every session's
    base, a pending rollback target and all their ancestors (so each stays restorable)."""
    from sandbox.snapshots import SnapshotStore

    # The lock: a running session's containers stand on its snapshots.
    with lab_locked(path), open_ledger(path) as ledger:
        lab_id = ledger.meta("lab_id")
        if not lab_id:
            raise ConfigError(f"{path} has no experiments yet: nothing to collect")
        experiments = ledger.experiments()
        keep_ids = {e.id for e in experiments if e.status == "keep"}
        keep_ids |= {base for s in ledger.sessions() for base in ledger.lane_bases(s.id).values() if base}
        if pending := ledger.meta("next_base"):
            keep_ids.add(int(pending))
        store = SnapshotStore()
        present = {s.name for s in store.list(lab=lab_id)}
        keep = [e.snapshot for e in experiments if e.id in keep_ids and e.snapshot in present]
        report = store.gc(keep=keep, dry_run=dry_run, name_prefix=f"{lab_id}-", lab=lab_id)
        if not dry_run:
            ledger.record_event(None, "gc", removed=report.removed, bytes_freed=report.bytes_freed)
        return report
