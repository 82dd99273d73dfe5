"""The Anthropic API failing, from the fake API (tests/fake_anthropic.py: a real HTTP server, the real SDK).

tests/test_claude_agent.py covers an error burst (529/500/429/dropped connection) retried, persistent 529s
(exit 3, then resume), dropped connections and a refused (400) request. This module adds what it does not:
an API that accepts a request and never answers (the client's timeout fires, the request is retried, then
a clean stop with the session saved), a failure after experiments completed (exit 3, both experiments kept
with their metrics, the next run resumes and numbers on), the backoff between retries, and `retry-after`
honoured but capped. Timing assertions are lower bounds from the fake's request clock, and upper bounds
only generous enough to catch a hang.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from harness.agents import claude as claude_module
from harness.agents.claude import ClaudeAgent
from harness.config import load_config
from tests.fake_anthropic import error, fake_anthropic, hang, reply, tool  # noqa: F401 (fixture)
from tests.test_claude_agent import LABRAT, lab, ledger_of, run_session, write_config  # noqa: F401 (fixture)

# The SDK warns that claude-sonnet-4-5 (the fake's model) nears its end of life; that is not what this tests.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
HANG = 60.0  # how long a hung request would block without a client timeout


def gaps(requests) -> list[float]:
    return [b.at - a.at for a, b in zip(requests, requests[1:])]


def test_the_client_has_bounded_timeouts(lab, fake_anthropic):
    """The default client: no request can block a run for more than REQUEST_TIMEOUT per try (the SDK's own
    default would be 10 minutes to connect too)."""
    client = ClaudeAgent(load_config(lab), "program").client
    assert client.timeout.read == claude_module.REQUEST_TIMEOUT <= 600
    assert client.timeout.connect == claude_module.CONNECT_TIMEOUT <= 30
    assert client.max_retries == claude_module.MAX_RETRIES
    assert 0 < claude_module.MAX_RETRY_WAIT <= 120


def test_a_hung_api_times_out_is_retried_then_the_session_stops_resumable(lab, fake_anthropic, monkeypatch):
    fake = fake_anthropic
    monkeypatch.setattr(claude_module, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(claude_module, "MAX_RETRIES", 2)
    fake.script(
        hang(HANG),  # the first try hangs: the timeout fires and the SDK retries the same request
        reply(tool("bash", {"command": "echo after the hang"})),
        hang(HANG), hang(HANG), hang(HANG),  # then the API hangs for good: 1 try + 2 retries
    )
    outcome = run_session(lab)

    assert [status for status, _ in fake.answers] == [-1, 200, -1, -1, -1]
    first, retried = fake.requests[:2]
    assert retried.raw == first.raw and retried.headers.get("x-stainless-retry-count") == "1"
    assert 1.0 <= retried.at - first.at < HANG / 2  # the timeout fired, long before the hang would have ended
    assert [r.headers.get("x-stainless-retry-count") for r in fake.requests[2:]] == ["0", "1", "2"]
    assert fake.requests[-1].at - fake.requests[0].at < HANG  # no try waited out its hang
    # One line, that says what happened; the session is saved and resumable.
    assert outcome.failure.startswith(f"Anthropic API timed out at {fake.url}")
    assert outcome.failure.endswith("gave up after 2 retries") and "\n" not in outcome.failure
    ledger = ledger_of(lab)
    session = ledger.last_session()
    assert session.id == outcome.session_id and session.resumable
    assert session.stop_reason.startswith("agent stopped: Anthropic API timed out")
    calls = ledger.db.execute("SELECT name, output FROM tool_calls").fetchall()
    assert [(c["name"], c["output"].splitlines()[0]) for c in calls] == [("bash", "after the hang")]
    ledger.close()


def test_a_failure_after_experiments_exits_3_and_the_next_run_resumes_the_numbering(lab, fake_anthropic):
    fake = fake_anthropic
    write_config(lab, max_experiments=3)
    fake.script(
        reply(tool("run_experiment", {"description": "first: the baseline"})),
        reply(tool("run_experiment", {"description": "second: the same again"})),
        *[error(500)] * (claude_module.MAX_RETRIES + 1),  # retry-after-ms: 10, so the retries are quick
    )
    run = subprocess.run([LABRAT, "run", "--lab", str(lab), "--agent", "claude"], capture_output=True, text=True,
                         timeout=400, env=dict(os.environ))

    assert run.returncode == 3, run.stderr[-3000:]
    assert "Traceback" not in run.stderr + run.stdout
    errors = [line for line in run.stderr.splitlines() if "labrat: error:" in line]
    assert errors == [f"labrat: error: Anthropic API: HTTP 500 api_error: Internal server error (gave up after "
                      f"{claude_module.MAX_RETRIES} retries) (state saved: `labrat run` resumes)"], run.stderr[-3000:]
    assert [status for status, _ in fake.answers] == [200, 200] + [500] * (claude_module.MAX_RETRIES + 1)
    ledger = ledger_of(lab)
    failed = ledger.last_session()
    assert failed.resumable and failed.stop_reason.startswith("agent stopped: Anthropic API: HTTP 500 api_error")
    done = ledger.experiments()
    assert [(e.id, e.description) for e in done] == [(1, "first: the baseline"), (2, "second: the same again")]
    for e in done:  # both completed and recorded with their metric before the API failed
        assert e.status in ("keep", "discard") and e.metric is not None and e.session_id == failed.id
    base = failed.base_experiment_id
    assert base == min(done, key=lambda e: e.metric).id
    results_tsv = (lab / "results.tsv").read_text().splitlines()
    assert len(results_tsv) == 3  # header + both experiments
    ledger.close()

    # The API is back: the next run resumes the same session from its base and numbers on.
    fake.script(reply(tool("run_experiment", {"description": "third: after the outage"})))
    outcome = run_session(lab)
    assert outcome.resumed and outcome.session_id == failed.id and outcome.failure is None
    assert outcome.reason == "max_experiments (3) reached"
    summary = fake.requests[-1].body["messages"][0]["content"][0]["text"]
    assert "The research session resumes." in summary and "Lab history: 2 experiments" in summary
    assert "Experiments left in this session: 1." in summary
    ledger = ledger_of(lab)
    third = ledger.experiments()[-1]
    assert (third.id, third.parent_id, third.description) == (3, base, "third: after the outage")
    assert not ledger.last_session().resumable
    ledger.close()


def test_retries_back_off_exponentially(lab, fake_anthropic, monkeypatch):
    """Errors with no retry-after: the SDK's backoff (0.5 s doubling, jitter 0.75-1x) spaces the retries."""
    fake = fake_anthropic
    monkeypatch.setattr(claude_module, "MAX_RETRIES", 4)
    fake.script(*[error(500, headers={})] * 5)
    outcome = run_session(lab)

    assert outcome.failure == "Anthropic API: HTTP 500 api_error: Internal server error (gave up after 4 retries)"
    assert len(fake.requests) == 5 and len({r.raw for r in fake.requests}) == 1
    spaced = gaps(fake.requests)
    for retry, gap in enumerate(spaced):  # at least the smallest backoff (a loaded machine only adds to it)
        assert gap >= 0.75 * 0.5 * 2**retry - 0.05, spaced
    for earlier, later in zip(spaced, spaced[1:]):  # growing (within what noise can take from a doubling)
        assert later > 0.75 * earlier, spaced
    assert spaced[-1] > 2.5 * spaced[0], spaced
    assert sum(spaced) < 60, spaced
    ledger = ledger_of(lab)
    assert ledger.last_session().resumable
    ledger.close()


def test_retry_after_is_honoured_up_to_a_cap(lab, fake_anthropic, monkeypatch):
    """A 429's retry-after is waited out; one that asks for longer than MAX_RETRY_WAIT (the SDK would wait
    days) is cut to it, so a bad header cannot stall a run."""
    fake = fake_anthropic
    monkeypatch.setattr(claude_module, "MAX_RETRY_WAIT", 3.0)
    fake.script(
        error(429, headers={"retry-after": "2"}),
        error(429, headers={"retry-after": "45"}),
        reply(tool("bash", {"command": "echo through the rate limit"})),
    )
    outcome = run_session(lab)

    assert outcome.failure is None and outcome.reason == "the agent stopped working"  # the script's end: idle
    assert [status for status, _ in fake.answers][:3] == [429, 429, 200]
    honoured, capped = gaps(fake.requests[:3])
    assert honoured >= 2.0, honoured
    assert 3.0 <= capped < 30, capped  # waited the cap, not the 45 s asked
    assert fake.requests[2].headers.get("x-stainless-retry-count") == "2"
    ledger = ledger_of(lab)
    output, = [row["output"] for row in ledger.db.execute("SELECT output FROM tool_calls")]
    assert output.startswith("through the rate limit")
    ledger.close()
