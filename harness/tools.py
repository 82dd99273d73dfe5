"""The agent's tools: Anthropic tool-use schemas, pydantic-validated inputs, and their execution.

Every tool that touches code runs in the session's working container through `sandbox`; history
tools read the ledger. A bad call never raises out of `Toolbox.call`: it returns a short, precise
error that the agent can act on, and the loop goes on.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness import failpoints, history
from harness.ledger import Experiment
from harness.session import Session
from harness.text import clip, one_line, printable
from harness.workbench import Workbench
from sandbox.errors import EngineUnavailable, FileMissing, FileTooLarge, PathRefused, SandboxClosed, SandboxError

log = structlog.get_logger(__name__)

MODEL_OUTPUT_CHARS = 12_000  # what one tool result may put into the model's context (head and tail kept)
ERROR_CHARS = 1_000  # a refusal or failure message: one precise line, however long the input it names
SHOWN_CHARS = 80  # an input value (a key, a path) quoted in a message
LOG_CHARS = 2_500  # of a crashed experiment's log, told to the agent
MAX_ID = 2**31 - 1  # experiment ids: larger ones cannot exist (and would overflow SQLite's INTEGER)
BASH_DEFAULT_TIMEOUT = 120.0
BASH_MAX_TIMEOUT = 600.0
EDITOR_MAX_FILE_BYTES = 1024 * 1024


class ToolResult(BaseModel):
    text: str
    is_error: bool = False


class ToolError(Exception):
    """A refused or failed tool call; the message goes to the agent as the tool result."""


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid", str_max_length=1_000_000)


class BashInput(_Input):
    """Anthropic's bash tool (bash_20250124): `command`, or `restart`; `timeout` is labrat's own (the offline
    agent's and the tests'; the model's schema is Anthropic's)."""
    command: str | None = Field(None, min_length=1, description="A bash script, run in /workspace as the unprivileged user.")
    restart: bool = False
    timeout: float | None = Field(None, gt=0, le=BASH_MAX_TIMEOUT, description="Seconds before it is killed (default 120).")

    @field_validator("command")
    @classmethod
    def _no_nul(cls, command: str | None) -> str | None:
        if command is not None and "\x00" in command:  # an exec argument cannot hold one: the engine would refuse it
            raise ValueError("a command cannot contain a NUL byte")
        return command

    @model_validator(mode="after")
    def _command_or_restart(self) -> BashInput:
        if self.command is None and not self.restart:
            raise ValueError("give a command (or restart: true)")
        return self


class EditorInput(_Input):
    """Anthropic's text editor (text_editor_20250728, named str_replace_based_edit_tool): no undo_edit."""
    command: Literal["view", "create", "str_replace", "insert"]
    path: str = Field(min_length=1, max_length=4096,
                      description="A path in /workspace (absolute, or relative to /workspace).")
    file_text: str | None = Field(None, description="create: the whole content of the file.")
    old_str: str | None = Field(None, description="str_replace: text that occurs exactly once in the file.")
    new_str: str | None = Field(None, description="str_replace: the replacement; insert: the text to insert.")
    insert_line: int | None = Field(None, ge=0, description="insert: the line number after which to insert (0 = top).")
    insert_text: str | None = Field(None, description="insert: alias of new_str.")
    view_range: list[int] | None = Field(None, min_length=2, max_length=2, description="view: [first, last] line, last -1 = end.")


class RunExperimentInput(_Input):
    description: str = Field(min_length=1, max_length=500, description="One line: the change.")
    hypothesis: str | None = Field(None, max_length=1000, description="Why it should help, stated before the result.")
    expected_delta: float | None = Field(None, ge=-10, le=10, allow_inf_nan=False,
                                         description="The change of val_bpb you expect against the current best "
                                                     "(negative: better), e.g. -0.01.")


class ListExperimentsInput(_Input):
    limit: int = Field(20, ge=1, le=200)


class ShowExperimentInput(_Input):
    id: int = Field(ge=1, le=MAX_ID)


class DiffInput(_Input):
    a: int = Field(ge=0, le=MAX_ID, description="An experiment id (0 = the lab's starting point, as shipped).")
    b: int = Field(ge=0, le=MAX_ID, description="An experiment id (0 = the lab's starting point, as shipped).")


TOOLS: dict[str, tuple[type[_Input], str]] = {
    "bash": (BashInput, "Run a bash command in the sandbox (no network; /workspace holds trainer/; the training split "
                        "is read-only at /data). Output is truncated; processes do not outlive the call."),
    "str_replace_based_edit_tool": (EditorInput, "View and edit files in /workspace: view, create, str_replace "
                                                 "(old_str must be unique), insert."),
    "run_experiment": (RunExperimentInput, "Train the current trainer/train.py for the fixed budget and evaluate it "
                                           "on held-out data. Kept if it beats the best by the lab's keep rule "
                                           "(under `significant`: by more than the noise, confirmed by re-runs with "
                                           "fresh seeds), else the workspace returns to the best version. Returns the "
                                           "measured val_bpb and why it was kept or not."),
    "list_experiments": (ListExperimentsInput, "The latest experiments of this lab with status and val_bpb."),
    "show_experiment": (ShowExperimentInput, "One experiment: metric, status, its diff against its parent, crash log."),
    "diff": (DiffInput, "Unified diff of the source files between two experiments."),
}


# The shell and the editor are Anthropic-defined tools: the model gets the schemas it was trained on. The
# rest are labrat's own, described by their pydantic models.
ANTHROPIC_TOOLS = {"bash": {"type": "bash_20250124"},
                   "str_replace_based_edit_tool": {"type": "text_editor_20250728", "max_characters": MODEL_OUTPUT_CHARS}}


def tool_specs() -> list[dict]:
    """The tools in the Anthropic Messages API format."""
    specs = []
    for name, (model, description) in TOOLS.items():
        if name in ANTHROPIC_TOOLS:
            specs.append({**ANTHROPIC_TOOLS[name], "name": name})
            continue
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        specs.append({"name": name, "description": description, "input_schema": schema})
    return specs


def shown(value: object) -> str:
    """An input value as quoted in a message: printable, on one line, at most about SHOWN_CHARS characters."""
    return one_line(value, SHOWN_CHARS)


def error_text(message: str) -> str:
    """A refusal or failure as the agent gets it: one printable line, short even when it quotes a huge input."""
    return one_line(message, ERROR_CHARS)


def outcome_text(e: Experiment, base: Experiment | None) -> str:
    """What the agent is told about an experiment it ran (`base`: the session's base after it)."""
    best = f"#{base.id} at val_bpb {base.metric:.6f}" if base and base.metric is not None else "none yet"
    if e.status in ("crash", "timeout"):
        return (f"experiment #{e.id}: {e.status}. {printable(e.log_tail or '')[-LOG_CHARS:]}\n"
                f"The workspace was reset to the best version ({best}).")
    gap = f", gap to the data's entropy floor {e.floor_gap:.4f}" if e.floor_gap is not None else ""
    with contextlib.suppress(TypeError, ValueError, KeyError):
        gap = f" ± {json.loads(e.eval_json)['val_bpb_se']:.4f} (standard error){gap}"
    memory = f", peak memory {e.memory_bytes / 1024**3:.2f} GB" if e.memory_bytes else ""
    verdict = ("kept: it is the new best; the workspace now holds it" if e.status == "keep"
               else f"discarded (not better than {best}); the workspace was reset to it")
    decision = f"\nThe keep rule: {printable(e.decision)}." if e.decision else ""
    return (f"experiment #{e.id}: val_bpb {e.metric:.6f}{gap}; training {e.train_seconds or 0:.1f} s{memory}. "
            f"{verdict}.{decision}")


def _validation_message(name: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        # The location names the agent's own keys (an extra key can be anything, a megabyte of escapes).
        where = ".".join(shown(part) for part in error["loc"]) or "input"
        problems.append(f"{where}: {error['msg']}")
    return error_text(f"invalid input for {name}: " + "; ".join(problems))


RESTORED = "the sandbox stopped (a limit killed it, or its engine restarted); it was restored to the session's base"


class Toolbox:
    """Executes an agent's tool calls for one session; every call is recorded in the ledger. The agent's
    only handle on the harness: it also takes the agent's API spend (`charge`)."""

    def __init__(self, session: Session, workbench: Workbench,
                 run_experiment: Callable[[str, str | None, float | None], Experiment]):
        self.session, self.workbench = session, workbench
        self._run_experiment_job = run_experiment

    def charge(self, tokens_in: int, tokens_out: int, cost_usd: float) -> None:
        """The agent's API spend; it is recorded with the next experiment."""
        self.session.add_usage(tokens_in, tokens_out, cost_usd)

    def call(self, name: str, raw_input: object) -> ToolResult:
        started = time.monotonic()
        failpoints.reach("tool.before")
        result = self._dispatch(name, raw_input)
        # Every result is printable (a file name or an output may hold terminal escapes) and bounded.
        result = ToolResult(text=clip(printable(result.text), MODEL_OUTPUT_CHARS), is_error=result.is_error)
        # The name is the model's: it may be anything, and the ledger's column takes text that encodes.
        recorded = shown(name if isinstance(name, str) else repr(name))
        self.session.record_tool_call(recorded, raw_input if isinstance(raw_input, dict) else {"raw": raw_input},
                                      result.text, result.is_error, time.monotonic() - started)
        failpoints.reach("tool.recorded")
        return result

    def _dispatch(self, name: str, raw_input: object) -> ToolResult:
        if not isinstance(name, str) or name not in TOOLS:
            return ToolResult(text=f"unknown tool {shown(repr(name))}; the tools are: {', '.join(TOOLS)}",
                              is_error=True)
        if not isinstance(raw_input, dict):
            return ToolResult(text=f"invalid input for {name}: expected a JSON object, got {type(raw_input).__name__}",
                              is_error=True)
        model, _ = TOOLS[name]
        try:
            args = model.model_validate(raw_input)
        except ValidationError as exc:
            return ToolResult(text=_validation_message(name, exc), is_error=True)
        if name != "run_experiment" and (refusal := self.session.tool_budget_refusal()):
            return ToolResult(text=refusal, is_error=True)
        try:
            return getattr(self, f"_{name}")(args)
        except (ToolError, PathRefused, FileMissing, FileTooLarge) as exc:
            return ToolResult(text=error_text(str(exc)), is_error=True)
        except (SandboxClosed, EngineUnavailable):
            # A limit killed the container, or the Docker engine restarted under it.
            self.workbench.restore()
            return ToolResult(text=f"{RESTORED} and your uncommitted edits are gone", is_error=True)
        except SandboxError as exc:  # e.g. a file operation timed out on a loaded machine: the agent may retry
            return ToolResult(text=error_text(f"the sandbox could not complete the call: {exc}"), is_error=True)

    # -- bash ----------------------------------------------------------------------------------------
    def _bash(self, args: BashInput) -> ToolResult:
        if args.command is None:  # restart: there is no shell to restart, each call runs in a fresh one
            return ToolResult(text="the shell was restarted (each call runs in a fresh shell; the workspace is as it was)")
        timeout = args.timeout or BASH_DEFAULT_TIMEOUT
        run = self.workbench.box.exec(args.command, timeout=timeout)
        if run.limit == "died" or run.limit == "memory" and self.workbench.is_dead():
            self.workbench.start()
            return ToolResult(text=f"{run.stderr.strip()}\n[labrat: the sandbox was restored to the session's base; "
                                   "uncommitted edits are gone]", is_error=True)
        parts = []
        if run.stdout:
            parts.append(run.stdout.rstrip("\n"))
        if run.stderr:
            parts.append("[stderr]\n" + run.stderr.rstrip("\n"))
        parts.append(f"[exit code {run.exit_code if run.exit_code is not None else 'none'}, {run.duration:.1f} s]")
        return ToolResult(text="\n".join(parts), is_error=run.exit_code != 0 or run.limit is not None)

    # -- the text editor (Anthropic's str_replace_based_edit_tool conventions) -----------------------
    def _str_replace_based_edit_tool(self, args: EditorInput) -> ToolResult:
        return getattr(self, f"_edit_{args.command}")(args)

    def _read(self, path: str) -> str:
        data = self.workbench.box.read_file(path, max_bytes=EDITOR_MAX_FILE_BYTES)
        if b"\x00" in data:
            raise ToolError(f"{path} is a binary file; the editor only handles text")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path} is not UTF-8 text; the editor only handles text") from None

    def _edit_view(self, args: EditorInput) -> ToolResult:
        try:
            text = self._read(args.path)
        except PathRefused as exc:
            if "is a directory" not in str(exc):
                raise
            entries = self.workbench.box.list_dir(args.path, max_entries=500)
            return ToolResult(text="\n".join(f"{e.name}{'/' if e.kind == 'dir' else ''}\t{e.size}" for e in entries)
                              or "(empty directory)")
        lines = text.splitlines()
        first, last = 1, len(lines)
        if args.view_range:
            first, last = args.view_range
            last = len(lines) if last == -1 else last
            if not 1 <= first <= max(len(lines), 1) or last < first or last > len(lines):
                raise ToolError(f"view_range {args.view_range} is outside the file's {len(lines)} lines")
        numbered = "\n".join(f"{n:6}\t{lines[n - 1]}" for n in range(first, last + 1))
        return ToolResult(text=printable(numbered) or "(empty file)")

    def _edit_create(self, args: EditorInput) -> ToolResult:
        if args.file_text is None:
            raise ToolError("create needs file_text")
        self.workbench.box.write_file(args.path, args.file_text)
        return ToolResult(text=f"wrote {args.path} ({len(args.file_text.encode())} bytes)")

    def _edit_str_replace(self, args: EditorInput) -> ToolResult:
        if not args.old_str:
            raise ToolError("str_replace needs a non-empty old_str")
        text = self._read(args.path)
        count = text.count(args.old_str)
        if count == 0:
            raise ToolError(f"no replacement was performed: old_str did not appear verbatim in {args.path}")
        if count > 1:
            starts = [i for i in range(len(text)) if text.startswith(args.old_str, i)]
            line_numbers = [text.count("\n", 0, i) + 1 for i in starts][:10]
            raise ToolError(f"no replacement was performed: old_str occurs {count} times (lines {line_numbers}); "
                            "include more context to make it unique")
        new_text = text.replace(args.old_str, args.new_str or "")
        self.workbench.box.write_file(args.path, new_text)
        line = text[: text.index(args.old_str)].count("\n") + 1
        snippet_lines = new_text.splitlines()[max(0, line - 4): line + 4 + (args.new_str or "").count("\n")]
        snippet = "\n".join(f"{max(1, line - 3) + i:6}\t{s}" for i, s in enumerate(snippet_lines))
        return ToolResult(text=f"edited {args.path}; the changed region now reads:\n{printable(snippet)}")

    def _edit_insert(self, args: EditorInput) -> ToolResult:
        new = args.new_str if args.new_str is not None else args.insert_text
        if new is None or args.insert_line is None:
            raise ToolError("insert needs insert_line and new_str (or insert_text)")
        text = self._read(args.path)
        lines = text.splitlines(keepends=True)
        if args.insert_line > len(lines):
            raise ToolError(f"insert_line {args.insert_line} is past the end of the file ({len(lines)} lines)")
        if lines and not lines[-1].endswith("\n") and args.insert_line == len(lines):
            lines[-1] += "\n"
        lines.insert(args.insert_line, new if new.endswith("\n") else new + "\n")
        self.workbench.box.write_file(args.path, "".join(lines))
        return ToolResult(text=f"inserted {new.count(chr(10)) + 1} line(s) after line {args.insert_line} of {args.path}")

    # -- experiments and history ----------------------------------------------------------------------
    def _run_experiment(self, args: RunExperimentInput) -> ToolResult:
        # The description is shown in tables and the live view, which rich renders as markup: a "[/]" would
        # crash `labrat log`, so brackets become parentheses (as in the agent's failure reasons).
        description = args.description.replace("[", "(").replace("]", ")")
        hypothesis = args.hypothesis.replace("[", "(").replace("]", ")") if args.hypothesis else None
        if reason := self.session.stop_reason():  # e.g. another lane's experiment took the last of the budget
            return ToolResult(text=f"no experiment started: the session is stopping ({reason})", is_error=True)
        experiment = self._run_experiment_job(description, hypothesis, args.expected_delta)
        return ToolResult(text=outcome_text(experiment, self.session.base),
                          is_error=experiment.status in ("crash", "timeout"))

    def _list_experiments(self, args: ListExperimentsInput) -> ToolResult:
        return ToolResult(text=history.experiment_list(self.session.ledger.experiments(), args.limit))

    def _show_experiment(self, args: ShowExperimentInput) -> ToolResult:
        try:
            experiment = self.session.ledger.experiment(args.id)
        except KeyError:
            raise ToolError(f"no experiment #{args.id}") from None
        ledger = self.session.ledger
        standing = history.Standing.of(ledger, experiment, ledger.session(experiment.session_id).config)
        return ToolResult(text=history.experiment_detail(experiment, standing=standing))

    def _sources(self, experiment_id: int) -> dict[str, str]:
        try:
            return self.session.sources(experiment_id)
        except KeyError:
            raise ToolError(f"no experiment #{experiment_id}") from None

    def _diff(self, args: DiffInput) -> ToolResult:
        old, new = self._sources(args.a), self._sources(args.b)
        text = history.unified_diff(old, new, f"#{args.a}", f"#{args.b}")
        return ToolResult(text=text or f"#{args.a} and #{args.b} have the same sources")
