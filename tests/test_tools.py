"""The agent's tools against a real session's working container: editor, bash, history, bad calls."""

import json

import pytest

from harness.config import LabConfig
from harness.run import LabRun
from harness.tools import MODEL_OUTPUT_CHARS, tool_specs
from sandbox.snapshots import SnapshotStore

EDIT = "str_replace_based_edit_tool"


@pytest.fixture(scope="module")
def toolbox(tmp_path_factory):
    lab = tmp_path_factory.mktemp("lab")
    config = LabConfig(time_budget=10, eval_tokens=4096, max_experiments=1, max_tool_calls=500)
    with LabRun(lab, config, agent="test") as run:
        yield run.toolbox
    SnapshotStore().gc(keep=[], name_prefix=run.lab_id)


def call(toolbox, name, **tool_input):
    return toolbox.call(name, tool_input)


def test_specs_are_anthropic_tool_definitions():
    specs = {spec["name"]: spec for spec in tool_specs()}
    assert set(specs) == {"bash", EDIT, "run_experiment", "list_experiments", "show_experiment", "diff"}
    # The shell and the editor are Anthropic-defined: the type names the schema the model was trained on.
    assert specs["bash"] == {"type": "bash_20250124", "name": "bash"}
    assert specs[EDIT] == {"type": "text_editor_20250728", "name": EDIT, "max_characters": MODEL_OUTPUT_CHARS}
    experiment = specs["run_experiment"]["input_schema"]
    assert experiment["type"] == "object" and experiment["required"] == ["description"]
    assert experiment.get("additionalProperties") is False and "type" not in specs["run_experiment"]


def test_bash_restart_and_an_empty_call(toolbox):
    restarted = call(toolbox, "bash", restart=True)
    assert not restarted.is_error and "fresh shell" in restarted.text
    empty = call(toolbox, "bash")
    assert empty.is_error and "give a command (or restart: true)" in empty.text
    retired = call(toolbox, EDIT, command="undo_edit", path="notes/plan.md")  # not in text_editor_20250728
    assert retired.is_error and "command: Input should be 'view', 'create', 'str_replace' or 'insert'" in retired.text


def test_editor_view_create_replace_insert(toolbox):
    view = call(toolbox, EDIT, command="view", path="trainer/train.py", view_range=[1, 3])
    assert not view.is_error and view.text.splitlines()[0].startswith("     1\t")
    assert len(view.text.splitlines()) == 3

    assert not call(toolbox, EDIT, command="create", path="notes/plan.md", file_text="a\nb\nc\n").is_error
    replaced = call(toolbox, EDIT, command="str_replace", path="/workspace/notes/plan.md", old_str="b", new_str="B")
    assert not replaced.is_error and "B" in replaced.text
    assert not call(toolbox, EDIT, command="insert", path="notes/plan.md", insert_line=0, new_str="top").is_error
    assert toolbox.workbench.box.read_text("notes/plan.md") == "top\na\nB\nc\n"

    missing = call(toolbox, EDIT, command="str_replace", path="notes/plan.md", old_str="zzz", new_str="y")
    assert missing.is_error and "did not appear verbatim" in missing.text
    call(toolbox, EDIT, command="create", path="notes/twice.txt", file_text="x\nx\n")
    twice = call(toolbox, EDIT, command="str_replace", path="notes/twice.txt", old_str="x", new_str="y")
    assert twice.is_error and "occurs 2 times (lines [1, 2])" in twice.text

    assert not call(toolbox, EDIT, command="insert", path="notes/plan.md", insert_line=4, insert_text="end").is_error
    assert toolbox.workbench.box.read_text("notes/plan.md") == "top\na\nB\nc\nend\n"  # text_editor_20250728's name

    listing = call(toolbox, EDIT, command="view", path="trainer")
    assert "train.py" in listing.text and not listing.is_error


@pytest.mark.parametrize("path", ["/etc/passwd", "../etc/passwd", "trainer/../../etc/shadow", "pw", "etc/passwd"])
def test_editor_refuses_paths_outside_the_workspace(toolbox, path):
    call(toolbox, "bash", command="ln -sfn /etc/passwd /workspace/pw; ln -sfn /etc /workspace/etc")
    result = call(toolbox, EDIT, command="view", path=path)
    assert result.is_error and ("outside the workspace" in result.text or "leaves the workspace" in result.text)
    assert "root:" not in result.text


def test_editor_refuses_binary_files_and_write_to_read_only_ones(toolbox):
    call(toolbox, "bash", command="head -c 300 /dev/urandom > /workspace/blob.bin; printf 'a\\0b' >> /workspace/blob.bin")
    binary = call(toolbox, EDIT, command="view", path="blob.bin")
    assert binary.is_error and "binary" in binary.text
    protected = call(toolbox, EDIT, command="create", path="trainer/evaluate.py", file_text="print('fake metric')")
    assert protected.is_error and "permission denied" in protected.text


def test_bash_output_exit_code_timeout_and_flood(toolbox):
    ok = call(toolbox, "bash", command="echo hello; echo oops >&2; exit 3")
    assert ok.is_error and "hello" in ok.text and "[stderr]\noops" in ok.text and "exit code 3" in ok.text
    looped = call(toolbox, "bash", command="while true; do :; done", timeout=1)
    assert looped.is_error and "timeout" in looped.text
    flood = call(toolbox, "bash", command="yes labrat | head -c 5000000")
    assert len(flood.text) <= MODEL_OUTPUT_CHARS + 200 and "cut" in flood.text
    after = call(toolbox, "bash", command="whoami; pwd")  # the container is still usable
    assert after.text.startswith("agent\n/workspace")


@pytest.mark.parametrize(("name", "tool_input", "message"), [
    ("rm_rf", {}, "unknown tool 'rm_rf'"),
    ("bash", "ls", "expected a JSON object, got str"),
    ("bash", {}, "give a command (or restart: true)"),
    ("bash", {"command": 42}, "command: Input should be a valid string"),
    ("bash", {"command": "ls", "timeout": 10_000}, "timeout: Input should be less than or equal to 600"),
    ("bash", {"command": "ls", "sudo": True}, "sudo: Extra inputs are not permitted"),
    (EDIT, {"command": "delete", "path": "x"}, "command: Input should be 'view', 'create'"),
    (EDIT, {"command": "create", "path": "x"}, "create needs file_text"),
    (EDIT, {"command": "view", "path": "a\x00b"}, "NUL byte"),
    ("show_experiment", {"id": "seven"}, "id: Input should be a valid integer"),
    ("show_experiment", {"id": 999}, "no experiment #999"),
    ("diff", {"a": 0, "b": 12345}, "no experiment #12345"),
    ("run_experiment", {"description": ""}, "description: String should have at least 1 character"),
    ("run_experiment", {"description": "x" * 200_000}, "description: String should have at most 500 characters"),
    ("run_experiment", {"description": "d", "expected_delta": "NaN"}, "expected_delta: Input should be a finite number"),
    ("run_experiment", {"description": "d", "expected_delta": -50}, "expected_delta: Input should be greater than or equal to -10"),
    ("run_experiment", {"description": "d", "hypothesis": "h" * 5000}, "hypothesis: String should have at most 1000"),
])
def test_malformed_calls_get_a_precise_error(toolbox, name, tool_input, message):
    result = toolbox.call(name, tool_input)
    assert result.is_error and message in result.text and len(result.text) < 1000


def test_history_tools_and_the_ledger_record(toolbox):
    assert call(toolbox, "list_experiments").text == "no experiments yet"
    same = call(toolbox, "diff", a=0, b=0)
    assert "same sources" in same.text
    calls = toolbox.session.ledger.db.execute("SELECT name, is_error, input_json FROM tool_calls").fetchall()
    assert any(row["name"] == "diff" and not row["is_error"] for row in calls)
    assert all(json.loads(row["input_json"]) is not None for row in calls)


def test_the_tool_call_budget_forces_an_experiment_then_stops_the_session(toolbox):
    session = toolbox.session
    saved, session.config = session.config, session.config.model_copy(update={"max_tool_calls": 2})
    session.calls_since_experiment = 0
    try:
        assert not call(toolbox, "bash", command="true").is_error
        assert not call(toolbox, "bash", command="true").is_error
        refused = call(toolbox, "bash", command="true")
        assert refused.is_error and "call run_experiment now" in refused.text
        call(toolbox, "bash", command="true")
        assert session.stop_reason() is None
        call(toolbox, "bash", command="true")
        assert "without running an experiment" in session.stop_reason()
    finally:
        session.config, session.stop, session.calls_since_experiment = saved, None, 0
