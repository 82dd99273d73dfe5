"""The Claude agent against a fake Messages API over real HTTP, with the real SDK, real sessions and Docker.

Nothing is mocked: the `anthropic` SDK talks HTTP to tests/fake_anthropic.py, the agent's tool calls run
in real hardened containers, experiments train and evaluate for real (3 deterministic steps), and the ledger,
snapshots and logs are the real ones.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from harness import logs
from harness.agents import claude as claude_module
from harness.agents.claude import ClaudeAgent, usage_cost
from harness.config import ConfigError, load_config
from harness.lab import LEDGER_FILE, read_program
from harness.ledger import Ledger
from harness.run import LabRun
from harness.tools import TOOLS, tool_specs
from sandbox.engine import LABEL_OWNER_PID, LABEL_ROLE, LABEL_SESSION, client, owner_labels
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, SESSION, make_lab
from tests.fake_anthropic import drop, end_turn, error, fake_anthropic, reply, tool  # noqa: F401 (fixture)

EDITOR = "str_replace_based_edit_tool"
TRAIN = "trainer/train.py"
CACHE = {"type": "ephemeral"}
# The SDK warns that the default model, claude-sonnet-4-5, nears its end of life; that is not what these test.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


# -- helpers ---------------------------------------------------------------------------------------
def write_config(lab: Path, **settings) -> None:
    # Deterministic steps: these tests drive the agent's plumbing, not the budget (a 10 s all-in budget
    # timed out on a loaded runner).
    make_lab(lab, **{**dict(agent="claude", model="claude-sonnet-4-5", eval_tokens=4096, max_experiments=1), **settings})


@pytest.fixture
def lab(tmp_path):
    """A lab directory with a tiny budget; every snapshot its sessions made is removed afterwards."""
    path = tmp_path / "lab"
    path.mkdir()
    write_config(path)
    yield path
    if (path / LEDGER_FILE).exists():
        ledger = Ledger(path / LEDGER_FILE)
        lab_id = ledger.meta("lab_id")
        ledger.close()
        if lab_id:
            SnapshotStore().gc(keep=[], name_prefix=lab_id)


@dataclass
class Outcome:
    reason: str | None
    failure: str | None
    session_id: str
    lab_id: str
    resumed: bool


def run_session(lab: Path) -> Outcome:
    """One `labrat run` in this process: the same LabRun + agent wiring as harness/cli.py."""
    config = load_config(lab)
    agent = ClaudeAgent(config, read_program(lab))
    run = LabRun(lab, config, agent=config.agent, model=agent.model).__enter__()
    failure = run.run_agent(agent)
    return Outcome(run.session.stop, failure, run.session_id, run.lab_id, run.session.resumed)


def ledger_of(lab: Path) -> Ledger:
    return Ledger(lab / LEDGER_FILE)


def results_for(fake, request_index: int) -> list[dict]:
    """The tool_result blocks of the last user message of one request."""
    return [b for b in fake.requests[request_index].body["messages"][-1]["content"] if b.get("type") == "tool_result"]


def markers(value) -> list[str]:
    """JSON paths of every cache_control in a request body."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if "cache_control" in node:
                found.append(path)
            for key, child in node.items():
                walk(child, f"{path}.{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]")

    walk(value, "")
    return found


def chars(request) -> int:
    return len(json.dumps(request.body["messages"], ensure_ascii=False))


# -- without a session -----------------------------------------------------------------------------
def test_missing_key_is_a_one_line_config_error(lab, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        ClaudeAgent(load_config(lab), "program")
    message = str(info.value)
    assert "ANTHROPIC_API_KEY" in message and "--agent offline" in message and "\n" not in message

    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    run = subprocess.run([LABRAT, "run", "--lab", str(lab), "--agent", "claude"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("labrat: error:")]
    assert len(errors) == 1 and "ANTHROPIC_API_KEY" in errors[0] and "--agent offline" in errors[0]
    assert "Traceback" not in run.stderr
    assert not (lab / LEDGER_FILE).exists() or not ledger_of(lab).sessions()  # refused before any session


def test_prices_per_model_and_cache_multipliers(monkeypatch):
    class Usage:
        input_tokens, output_tokens = 1_000_000, 1_000_000
        cache_creation_input_tokens, cache_read_input_tokens = 1_000_000, None

    assert usage_cost("claude-sonnet-4-5", Usage) == (2_000_000, 1_000_000, pytest.approx(3 + 3.75 + 15))
    assert usage_cost("claude-sonnet-4-5-20250929", Usage)[2] == pytest.approx(21.75)
    assert usage_cost("claude-opus-4-5", Usage)[2] == pytest.approx(5 + 6.25 + 25)
    assert usage_cost("claude-opus-4-1-20250805", Usage)[2] == pytest.approx(15 + 18.75 + 75)
    assert usage_cost("claude-haiku-4-5", Usage)[2] == pytest.approx(1 + 1.25 + 5)
    Usage.cache_read_input_tokens = 1_000_000
    assert usage_cost("claude-sonnet-4", Usage) == (3_000_000, 1_000_000, pytest.approx(3 + 3.75 + 0.3 + 15))
    # An unknown model is priced as sonnet, with one warning.
    monkeypatch.setattr(claude_module, "_warned_models", set())
    warnings = []
    monkeypatch.setattr(claude_module, "log", type("L", (), {"warning": lambda self, *a, **k: warnings.append(k)})())
    assert usage_cost("claude-future-9", Usage)[2] == pytest.approx(22.05)
    usage_cost("claude-future-9", Usage)
    assert warnings == [{"model": "claude-future-9", "priced_as": "claude-sonnet-4-5"}]


# -- sessions --------------------------------------------------------------------------------------
def test_scripted_session_edits_runs_and_accounts_tokens(lab, fake_anthropic):
    fake = fake_anthropic
    write_config(lab, model="claude-opus-4-5")  # $5 / $25 per million tokens
    fake.script(
        reply(tool(EDITOR, {"command": "view", "path": TRAIN}), text="Let me read the trainer first."),
        reply(tool(EDITOR, {"command": "str_replace", "path": TRAIN,
                            "old_str": "embed_lr=0.3,", "new_str": "embed_lr=0.5,"})),
        reply(tool("run_experiment", {"description": "embed_lr 0.3 -> 0.5: learn faster in a 3 s budget",
                                      "hypothesis": "a higher embedding rate [learns] faster in a short budget",
                                      "expected_delta": -0.01})),
    )
    outcome = run_session(lab)

    assert outcome.reason == "max_experiments (1) reached" and outcome.failure is None
    assert len(fake.requests) == 3 and not fake.violations
    first, second, third = (r.body for r in fake.requests)
    # The key reached the API (and only as the credential header); the model and tools are the lab's.
    assert all(r.api_key == fake.api_key for r in fake.requests)
    assert first["model"] == "claude-opus-4-5" and first["max_tokens"] > 0
    assert [t["name"] for t in first["tools"]] == list(TOOLS)
    # The shell and the editor travel as Anthropic-defined tools (the fake API checks their fixed names).
    assert [t.get("type", "custom") for t in first["tools"]][:2] == ["bash_20250124", "text_editor_20250728"]
    assert read_program(lab).strip() in first["system"][-1]["text"]
    assert "run_experiment" in first["system"][0]["text"]
    assert "No experiments yet" in first["messages"][0]["content"][0]["text"]
    # Prompt caching: the stable prefix (tools + system) ends in a breakpoint, and so does the latest user
    # message; earlier user messages lose theirs (never more than two markers).
    for body in (first, second, third):
        assert body["system"][-1]["cache_control"] == CACHE
        assert body["messages"][-1]["content"][-1]["cache_control"] == CACHE
        assert sorted(markers(body)) == sorted([
            f".system[{len(body['system']) - 1}]",
            f".messages[{len(body['messages']) - 1}].content[{len(body['messages'][-1]['content']) - 1}]"])
    # The transcript: the view's result (numbered lines) and the edit's confirmation went back as tool results.
    view, = results_for(fake, 1)
    assert not view["is_error"] and "embed_lr=0.3," in view["content"] and "\t" in view["content"]
    edit, = results_for(fake, 2)
    assert not edit["is_error"] and "edited trainer/train.py" in edit["content"] and "embed_lr=0.5," in edit["content"]
    assert [m["role"] for m in third["messages"]] == ["user", "assistant", "user", "assistant", "user"]
    assert third["messages"][1]["content"][0] == {"type": "text", "text": "Let me read the trainer first."}

    ledger = ledger_of(lab)
    experiment, = ledger.experiments()
    assert experiment.status == "keep" and experiment.metric is not None
    assert experiment.description == "embed_lr 0.3 -> 0.5: learn faster in a 3 s budget"
    # The hypothesis and the expected effect are on record (brackets made safe for rich), next to the result.
    assert experiment.hypothesis == "a higher embedding rate (learns) faster in a short budget"
    assert experiment.expected_delta == -0.01
    changed = [line for line in experiment.diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2 and "embed_lr=0.3," in changed[0]
    assert changed[1] == "+" + changed[0][1:].replace("embed_lr=0.3,", "embed_lr=0.5,")
    # Tokens and cost: every response's usage, cache writes and reads included, went to the experiment.
    usages = [body["usage"] for body in fake.replies]
    assert all(u["cache_read_input_tokens"] > 0 for u in usages[1:])  # the fake emulates the cache
    tokens_in = sum(u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] for u in usages)
    tokens_out = sum(u["output_tokens"] for u in usages)
    cost = sum(u["input_tokens"] * 5 + u["cache_creation_input_tokens"] * 6.25 + u["cache_read_input_tokens"] * 0.5
               + u["output_tokens"] * 25 for u in usages) / 1e6
    assert (experiment.tokens_in, experiment.tokens_out) == (tokens_in, tokens_out) and tokens_in > 0 and tokens_out > 0
    assert experiment.cost_usd == pytest.approx(cost) and cost > 0
    assert [row["name"] for row in ledger.db.execute("SELECT name FROM tool_calls ORDER BY id")] == \
        [EDITOR, EDITOR, "run_experiment"]
    session = ledger.last_session()
    assert session.agent == "claude" and session.model == "claude-opus-4-5" and not session.resumable
    ledger.close()


def test_malformed_tool_calls_come_back_as_errors_and_the_session_goes_on(lab, fake_anthropic):
    fake = fake_anthropic
    huge = "x" * 200_000
    fake.script(
        reply(
            tool("rm_rf_everything", {"path": "/"}),
            tool("show_experiment", {"id": "seven"}),
            tool(EDITOR, {"command": "view"}),
            tool("bash", "ls -la"),
            tool("bash", {"command": "ls", "sudo": True}),
            tool("run_experiment", {"description": huge}),
            tool("bash", {"command": "echo hi", "timeout": -1}),
            text="Trying a few things at once.",
        ),
        reply(tool("run_experiment", {"description": "baseline after a burst of malformed calls"})),
    )
    outcome = run_session(lab)

    assert outcome.reason == "max_experiments (1) reached" and outcome.failure is None
    assert len(fake.requests) == 2 and not fake.violations
    calls = fake.calls()[:7]
    results = results_for(fake, 1)
    assert [r["tool_use_id"] for r in results] == [c["id"] for c in calls]  # one result per call, in order
    expected = [
        ("unknown tool 'rm_rf_everything'", "the tools are: bash, str_replace_based_edit_tool, run_experiment"),
        ("invalid input for show_experiment:", "id: Input should be a valid integer"),
        ("invalid input for str_replace_based_edit_tool:", "path: Field required"),
        ("invalid input for bash:", "expected a JSON object, got str"),
        ("invalid input for bash:", "sudo: Extra inputs are not permitted"),
        ("invalid input for run_experiment:", "description: String should have at most 500 characters"),
        ("invalid input for bash:", "timeout: Input should be greater than 0"),
    ]
    for result, (start, detail) in zip(results, expected, strict=True):
        assert result["is_error"] is True, result
        assert result["content"].startswith(start) and detail in result["content"], result["content"]
        assert len(result["content"]) < 400
    # What went back to the API stays valid and small: the string input is echoed as {}, the 200 KB string
    # is elided from the transcript instead of being sent back.
    echoed = [b for b in fake.requests[1].body["messages"][1]["content"] if b["type"] == "tool_use"]
    assert echoed[3]["input"] == {} and echoed[0]["name"] == "rm_rf_everything"
    assert huge not in fake.requests[1].raw.decode() and chars(fake.requests[1]) < claude_module.TRANSCRIPT_CHAR_BUDGET

    ledger = ledger_of(lab)
    experiment, = ledger.experiments()  # the huge description never started one
    assert experiment.description == "baseline after a burst of malformed calls" and experiment.status == "keep"
    rows = ledger.db.execute("SELECT name, is_error FROM tool_calls ORDER BY id").fetchall()
    assert [(r["name"], r["is_error"]) for r in rows] == [(c["name"], 1) for c in calls] + [("run_experiment", 0)]
    ledger.close()


def test_a_command_that_loops_forever_is_killed_and_the_loop_goes_on(lab, fake_anthropic):
    fake = fake_anthropic
    fake.script(
        reply(tool("bash", {"command": "while true; do :; done", "timeout": 2})),
        reply(tool("bash", {"command": "echo still here; for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"})),
        reply(tool("run_experiment", {"description": "baseline after a runaway command"})),
    )
    outcome = run_session(lab)

    assert outcome.reason == "max_experiments (1) reached" and not fake.violations
    killed, = results_for(fake, 1)
    assert killed["is_error"] is True and "killed after 2 s wall-clock timeout" in killed["content"]
    assert 2 <= fake.requests[1].at - fake.requests[0].at < 15
    alive, = results_for(fake, 2)
    assert not alive["is_error"] and "still here" in alive["content"]
    assert "while true" not in alive["content"]  # the busy loop did not survive its call
    ledger = ledger_of(lab)
    assert [e.status for e in ledger.experiments()] == ["keep"]
    ledger.close()


def test_an_api_error_burst_is_retried_and_the_session_goes_on(lab, fake_anthropic):
    fake = fake_anthropic
    fake.script(drop(), error(529), error(500), error(429),
                reply(tool("run_experiment", {"description": "baseline through a burst of API errors"})))
    started = time.monotonic()
    outcome = run_session(lab)

    assert outcome.reason == "max_experiments (1) reached" and outcome.failure is None
    assert [status for status, _ in fake.answers] == [0, 529, 500, 429, 200]
    burst = fake.requests[:5]
    assert len({r.raw for r in burst}) == 1  # the same request, retried by the SDK
    assert [r.headers.get("x-stainless-retry-count") for r in burst] == ["0", "1", "2", "3", "4"]
    assert burst[-1].at - burst[0].at < 5  # retry-after-ms: 10 was honoured (only the drop backs off)
    ledger = ledger_of(lab)
    experiment, = ledger.experiments()
    usage = fake.replies[0]["usage"]
    assert experiment.status == "keep" and experiment.tokens_out == usage["output_tokens"]  # failures cost nothing
    assert time.monotonic() - started < 120
    ledger.close()


def test_persistent_api_failure_stops_with_a_one_line_error_and_the_session_resumes(lab, fake_anthropic):
    fake = fake_anthropic
    fake.script(*[error(529)] * 40)
    run = subprocess.run([LABRAT, "run", "--lab", str(lab), "--agent", "claude"], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ))

    assert run.returncode == 3, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    errors = [line for line in run.stderr.splitlines() if "labrat: error:" in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert errors[0].startswith("labrat: error: Anthropic API: HTTP 529 overloaded_error: Overloaded")
    assert f"gave up after {claude_module.MAX_RETRIES} retries" in errors[0] and "resumes" in errors[0]
    assert len(fake.requests) == claude_module.MAX_RETRIES + 1
    ledger = ledger_of(lab)
    failed = ledger.last_session()
    assert failed.resumable and failed.stop_reason.startswith("agent stopped: Anthropic API: HTTP 529")
    assert ledger.experiments() == []
    ledger.close()

    # The API is back: the next run resumes the same session and works on.
    fake.steps.clear()
    fake.script(reply(tool("run_experiment", {"description": "baseline once the API came back"})))
    outcome = run_session(lab)
    assert outcome.resumed and outcome.session_id == failed.id and outcome.reason == "max_experiments (1) reached"
    assert "The research session resumes." in fake.requests[-1].body["messages"][0]["content"][0]["text"]
    ledger = ledger_of(lab)
    assert [(e.session_id, e.status) for e in ledger.experiments()] == [(failed.id, "keep")]
    assert not ledger.last_session().resumable
    ledger.close()


def test_lost_connections_and_refused_requests_end_as_agent_failures(lab, fake_anthropic, monkeypatch):
    fake = fake_anthropic
    monkeypatch.setattr(claude_module, "MAX_RETRIES", 2)  # each retry of a dropped connection backs off ~0.5-1 s
    fake.script(drop(), drop(), drop())
    outcome = run_session(lab)
    assert outcome.failure.startswith(f"Anthropic API unreachable at {fake.url}")
    assert "RemoteProtocolError" in outcome.failure and outcome.failure.endswith("gave up after 2 retries")
    assert len(fake.requests) == 3
    ledger = ledger_of(lab)
    assert ledger.last_session().resumable
    ledger.close()

    # A request the API refuses (400) is not retried; its reason stays one printable line.
    fake.script(error(400, message="messages.0: [bad]\nrequest"))
    outcome = run_session(lab)
    assert outcome.resumed and len(fake.requests) == 4
    assert outcome.failure == "Anthropic API: HTTP 400 invalid_request_error: messages.0: (bad) request"


def test_the_agent_that_stops_calling_tools_is_nudged_then_stopped(lab, fake_anthropic):
    fake = fake_anthropic  # an empty script: every reply is end_turn with no tool use
    outcome = run_session(lab)

    assert outcome.reason == "the agent stopped working"
    assert len(fake.requests) == claude_module.MAX_IDLE_REPLIES and not fake.violations
    for request in fake.requests[1:]:
        last = request.body["messages"][-1]
        assert last["role"] == "user" and last["content"][-1]["text"] == claude_module.NUDGE
    ledger = ledger_of(lab)
    assert ledger.last_session().stop_reason == "the agent stopped working"
    ledger.close()


class ContainerWatch(threading.Thread):
    """Polls the engine for this process's containers and keeps each one's Config.Env and role."""

    def __init__(self):
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.seen: dict[str, dict] = {}
        self.engine = docker.from_env()  # its own connection: the session uses the shared client meanwhile

    def run(self):
        while not self.done.is_set():
            for container in self.engine.containers.list(
                    all=True, filters={"label": f"{LABEL_OWNER_PID}={os.getpid()}"}, ignore_removed=True):
                self.seen[container.id] = {"role": container.labels.get(LABEL_ROLE),
                                           "session": container.labels.get(LABEL_SESSION),
                                           "config": container.attrs["Config"]}
            self.done.wait(0.1)

    def stop(self):
        self.done.set()
        self.join(timeout=30)
        self.engine.close()


def _archive_contains(image_id: str, needle: bytes, path: str = "/") -> tuple[bool, bytes]:
    """Whether the image's filesystem under `path` holds `needle`; also the first 64 KiB of the tar."""
    container = client().containers.create(image_id, command="true", network_disabled=True,
                                           name=f"{SESSION}-export-{secrets.token_hex(3)}",
                                           labels=owner_labels(SESSION, "export"))
    try:
        stream, _ = container.get_archive(path, chunk_size=1 << 20)
        tail, head, found = b"", b"", False
        for chunk in stream:
            if len(head) < 65536:
                head += chunk[: 65536 - len(head)]
            if needle in tail + chunk:
                found = True
            tail = chunk[-len(needle):]
        return found, head
    finally:
        container.remove(force=True)


def test_the_api_key_never_reaches_a_container(lab, fake_anthropic):
    fake = fake_anthropic
    key = fake.api_key
    assert os.environ["ANTHROPIC_API_KEY"] == key  # the host process has it, as in real use
    probe = ("env; echo ---; tr '\\0' '\\n' < /proc/1/environ; echo ---; "
             "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < \"$f\"; done 2>/dev/null | sort -u; echo ---; "
             "grep -rIs sk-ant /workspace /home /tmp /etc /data /run 2>/dev/null | head -5; echo probe-done")
    dump = ("env > /workspace/env.txt; (tr '\\0' '\\n' < /proc/self/environ) > /workspace/self-environ.txt; "
            "(cat /proc/1/environ || true) > /workspace/pid1-environ.txt 2>&1; ls -la /workspace")
    fake.script(
        reply(tool("bash", {"command": probe})),
        reply(tool("bash", {"command": dump})),
        reply(tool("bash", {"command": "python -c 'import os; print(sorted(os.environ))'"})),
        reply(tool("run_experiment", {"description": "baseline with the environment dumped into the workspace"})),
    )
    watch = ContainerWatch()
    watch.start()
    logs.configure(level="warning", json=True, file=lab / "logs" / "labrat.log")  # as `labrat run` does
    try:
        outcome = run_session(lab)
    finally:
        logs.configure(level="warning", json=True)
        watch.stop()
    assert outcome.reason == "max_experiments (1) reached" and not fake.violations

    # 1. Not in anything sent to the API (the tool results of env, /proc/*/environ, grep), though the probes ran.
    assert all(r.api_key == key for r in fake.requests)
    for request in fake.requests:
        assert key not in request.raw.decode(), "the API key was sent back in a request body"
    probed, = results_for(fake, 1)
    assert "PATH=" in probed["content"] and "HOME=" in probed["content"] and "probe-done" in probed["content"]
    assert "ANTHROPIC" not in probed["content"]

    # 2. Not in any container's environment: working, training and evaluation containers alike.
    ours = [c for c in watch.seen.values() if c["session"] == outcome.session_id]
    assert {"work", "train", "eval-score", "eval-judge"} <= {c["role"] for c in ours}
    for container in ours:
        config_text = json.dumps(container["config"])
        assert key not in config_text and "ANTHROPIC" not in config_text, container["role"]

    # 3. Not in the snapshot images: their config, and every byte of their filesystem.
    snapshots = [s for s in SnapshotStore().list() if s.name.startswith(outcome.lab_id)]
    assert len(snapshots) == 1
    for snap in snapshots:
        image = client().images.get(snap.image_id)
        assert key not in json.dumps(image.attrs) and "ANTHROPIC" not in json.dumps(image.attrs["Config"])
        found, _ = _archive_contains(snap.image_id, key.encode())
        assert not found, f"the API key is in the filesystem of snapshot {snap.name}"
        has_dump, head = _archive_contains(snap.image_id, b"PATH=", "/workspace/env.txt")
        assert has_dump  # the environment dump is in the snapshot; the key is not

    # 4. Not in the lab's files: ledger (with its WAL), results.tsv, logs.
    files = [p for p in lab.rglob("*") if p.is_file()]
    assert any(p.name == "labrat.log" and p.stat().st_size > 0 for p in files)
    assert any(p.name.startswith(LEDGER_FILE) for p in files)
    for path in files:
        assert key.encode() not in path.read_bytes(), f"the API key is in {path}"
    ledger = ledger_of(lab)
    experiment, = ledger.experiments()
    assert "env.txt" in json.loads(experiment.sources_json)  # the dump was recorded, without the key
    ledger.close()


def test_the_context_stays_bounded_over_many_experiments(lab, fake_anthropic, monkeypatch):
    fake = fake_anthropic
    budget = 40_000
    monkeypatch.setattr(claude_module, "HISTORY_LINES", 3)
    monkeypatch.setattr(claude_module, "TRANSCRIPT_CHAR_BUDGET", budget)
    write_config(lab, max_experiments=6)
    cat = tool("bash", {"command": "cat trainer/train.py"})  # ~13 KB, clipped to 12,000 characters
    cycles = 6
    for i in range(1, cycles + 1):
        fake.script(
            reply(tool(EDITOR, {"command": "str_replace", "path": TRAIN, "old_str": "import numpy as np\n",
                                "new_str": f"raise SystemExit('deliberately broken, cycle {i}')\nimport numpy as np\n"}),
                  text=f"Cycle {i}: breaking the trainer on purpose."),
            *[reply(cat) for _ in range(8 if i == 3 else 2)],  # cycle 3 outgrows the budget within one experiment
            reply(tool("run_experiment", {"description": f"cycle {i}: a deliberately broken trainer"})),
        )
    outcome = run_session(lab)

    assert outcome.reason == "max_experiments (6) reached" and not fake.violations
    ledger = ledger_of(lab)
    assert [e.status for e in ledger.experiments()] == ["crash"] * cycles
    ledger.close()
    requests = fake.requests
    assert len(requests) == sum(8 if i == 3 else 2 for i in range(1, cycles + 1)) + 2 * cycles

    # Every experiment starts from one summary message, whose size does not grow with the history.
    starts = [r for r in requests if len(r.body["messages"]) == 1]
    assert len(starts) == cycles
    summaries = [r.body["messages"][0]["content"][0]["text"] for r in starts]
    assert "Lab history: 5 experiments (5 crash); the latest 3, oldest first:" in summaries[-1]
    assert "#3 (" in summaries[-1] and "#2 (" not in summaries[-1]
    assert "cycle 5: a deliberately broken trainer" in summaries[-1] and "crash" in summaries[-1]
    sizes = [chars(r) for r in starts]
    assert max(sizes[3:]) <= min(sizes[3:]) * 1.03, sizes  # saturated history: the same size every time
    assert max(sizes) < 12_000, sizes

    # Within an experiment the transcript stays under the character budget: older results are elided.
    assert max(chars(r) for r in requests) <= budget
    assert max(len(r.body["messages"]) for r in requests) <= 2 * 10 + 1
    sent = sum(len(b["content"]) for b in fake.tool_results().values())
    assert sent > 4 * budget  # what the tools returned in all: a full transcript would be several times the budget
    elided = [r for r in requests if claude_module.ELIDED in r.raw.decode()]
    assert elided, "cycle 3 should have needed elision"
    last = elided[-1].body["messages"]
    kept = [b for m in last for b in m["content"] if b.get("type") == "tool_result"][-1]
    assert not kept["content"].startswith(claude_module.ELIDED) and len(kept["content"]) > 10_000
    # The whole session cost was accounted, experiment by experiment.
    ledger = ledger_of(lab)
    assert all(e.tokens_in > 0 and e.cost_usd > 0 for e in ledger.experiments())
    ledger.close()


def test_the_fake_api_checks_tools_as_the_real_one_does():
    """Both forms of tool: Anthropic-defined (type and fixed name, no schema) and custom (name and schema)."""
    from tests.fake_anthropic import check_request

    def request(*tools):
        return {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], "tools": list(tools)}

    assert check_request(request(*tool_specs())) is None  # what the agent sends
    assert "must be named 'str_replace_based_edit_tool'" in check_request(
        request({"type": "text_editor_20250728", "name": "editor"}))
    assert "has no input_schema" in check_request(
        request({"type": "bash_20250124", "name": "bash", "input_schema": {"type": "object"}}))
    assert "each custom tool needs a name and an input_schema" in check_request(request({"name": "run_experiment"}))
    assert "each custom tool needs" in check_request(request({"type": "computer_20990101", "name": "x", "input_schema": {}}))
