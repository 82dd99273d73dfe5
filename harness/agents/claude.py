"""The Claude agent: the Anthropic Messages API with tool use, driving a session through its Toolbox.

    agent = ClaudeAgent(config, program)       # ConfigError when ANTHROPIC_API_KEY is not set
    reason = agent.run(toolbox, lab_view)      # until lab_view.stop_reason() says to stop

The API key is read here, in the host process, and handed to the SDK client only: it never enters a
tool input, a container, the ledger or a log. Transient API failures (429, 5xx, 529 overloaded,
dropped connections, timeouts) are retried by the SDK itself with exponential backoff that honours
`retry-after` / `retry-after-ms` (up to MAX_RETRY_WAIT); a request with no answer times out after
REQUEST_TIMEOUT and is retried too. Once those retries are spent the agent raises `AgentFailed` with a
one-line reason and the session is saved as resumable.

The context stays bounded however long the session runs: after every experiment the conversation
restarts from one compact summary message (best so far, the latest experiments one line each, how
to see more, what the last turn returned), and within one experiment the contents of older tool
results are elided once the transcript passes a character budget. Tools and the system prompt are
the stable, cached prefix; the latest user message carries a second cache breakpoint so each turn
of an experiment reads the previous turns from the cache.
"""

from __future__ import annotations

import json
import os
import re

import anthropic
import structlog

from harness import history
from harness.agents import AgentFailed
from harness.config import ConfigError, LabConfig
from harness.text import clip, one_line
from harness.session import LabView
from harness.tools import Toolbox, tool_specs

log = structlog.get_logger(__name__)

# -- knobs -------------------------------------------------------------------------------------------
MAX_TOKENS = 16_000  # per response; small enough for a non-streaming request
MAX_RETRIES = 8  # SDK retries of one request (backoff 0.5 s doubling to 8 s, or what retry-after asks)
REQUEST_TIMEOUT = 600.0  # seconds one request may go without a byte of its answer (a whole non-streaming reply)
CONNECT_TIMEOUT = 15.0  # seconds to connect: an unreachable API fails fast, not after REQUEST_TIMEOUT
MAX_RETRY_WAIT = 60.0  # seconds one retry may wait, whatever retry-after asks (the SDK would wait days)
HISTORY_LINES = 15  # experiments listed one line each in the summary that starts each experiment
TRANSCRIPT_CHAR_BUDGET = 120_000  # characters of messages sent in one request before older parts are elided
KEEP_RECENT_RESULTS = 4  # tool results (and tool inputs) kept intact when eliding
ELIDE_INPUT_CHARS = 2_000  # a tool input longer than this (as JSON) is elided from older turns
ELIDE_TEXT_CHARS = 1_000  # older assistant text is cut to this when eliding does not suffice
LAST_TURN_CHARS = 3_000  # per tool result of the turn that ran an experiment, carried into the summary
LAST_TURN_TOTAL_CHARS = 12_000
MAX_IDLE_REPLIES = 3  # consecutive replies without a tool call before the session stops
NUDGE = "continue: make a change and call run_experiment"
IDLE_STOP = "the agent stopped working"
CACHE = {"type": "ephemeral"}
ELIDED = "[labrat: elided"

# USD per million tokens (input, output); cache writes cost 1.25x input, cache reads 0.1x input.
PRICES: dict[str, tuple[float, float]] = {
    "claude-sonnet-4-6": (3.0, 15.0),  # the Sonnet tier's list price (not checkable offline: verify on anthropic.com)
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-sonnet-4-0": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-opus-4": (15.0, 75.0),
    "claude-opus-4-0": (15.0, 75.0),
    "claude-haiku-4-5": (1.0, 5.0),
}
DEFAULT_PRICE_MODEL = "claude-sonnet-4-5"
CACHE_WRITE_FACTOR = 1.25
CACHE_READ_FACTOR = 0.1
_MODEL_SUFFIX = re.compile(r"(-\d{8}|-latest|@\d{8})$")  # claude-sonnet-4-5-20250929, ...-latest
_warned_models: set[str] = set()

PREAMBLE = """\
You are an autonomous ML researcher working inside labrat, a harness that runs your experiments in \
hardened, snapshotted containers. Nobody will answer questions: work on your own, one experiment \
after another, until the harness ends the session.

Setup:
- Your tools act on a sandboxed Linux container with no network. /workspace holds trainer/ (train.py \
is the file you change); the training split is mounted read-only at /data.
- run_experiment(description, hypothesis, expected_delta) snapshots the workspace, trains it in a fresh container for a fixed \
wall-clock budget ({budget:g} s all-in: start-up, training and saving; train.py is told the deadline and \
is killed there, config {trainer_config}), and scores the checkpoint on held-out data with the harness's \
own evaluator (val_bpb, lower is better; a model that looks ahead or scores below what is attainable is \
rejected). It is kept by the lab's keep rule ({keep_rule}; under significant, only a gain beyond the \
measured noise, confirmed by training it again with fresh seeds); otherwise the workspace returns to the \
best version. Only that measured metric counts; the result says why it was kept or not.
- You may make at most {max_tool_calls} tool calls between two experiments.
- After every experiment this conversation restarts from a short summary of the lab's history; use \
list_experiments, show_experiment and diff to look further back.

Make one focused change at a time with a clear hypothesis, then call run_experiment. Keep tool output \
small (it is truncated), and never wait for input.

The lab's research program follows."""


def price(model: str) -> tuple[float, float]:
    """(input, output) USD per million tokens for a model name, dated or not; unknown: sonnet's, with one warning."""
    name = _MODEL_SUFFIX.sub("", model)
    if name in PRICES:
        return PRICES[name]
    if model not in _warned_models:
        _warned_models.add(model)
        log.warning("agent.unknown_model_price", model=model, priced_as=DEFAULT_PRICE_MODEL)
    return PRICES[DEFAULT_PRICE_MODEL]


def usage_cost(model: str, usage) -> tuple[int, int, float]:
    """(tokens in, tokens out, USD) of one response's `usage`; tokens in counts cache writes and reads."""
    fresh = getattr(usage, "input_tokens", None) or 0
    written = getattr(usage, "cache_creation_input_tokens", None) or 0
    read = getattr(usage, "cache_read_input_tokens", None) or 0
    out = getattr(usage, "output_tokens", None) or 0
    per_in, per_out = price(model)
    cost = (fresh * per_in + written * per_in * CACHE_WRITE_FACTOR + read * per_in * CACHE_READ_FACTOR
            + out * per_out) / 1_000_000
    return fresh + written + read, out, cost


def _reason(text: str) -> str:
    """A failure reason for AgentFailed: one line, short, without brackets (the CLI prints it as rich markup)."""
    return one_line(text, 200, fold=True).replace("[", "(").replace("]", ")")


_SURROGATES = {code: "\ufffd" for code in range(0xD800, 0xE000)}


def _sendable(value):
    """A value from the API as it can be sent back. The API's JSON may carry lone surrogates (`"\\ud800"` is
    valid JSON), and the SDK encodes requests as UTF-8: one such character in the echoed turn would raise
    out of every later request. Each becomes U+FFFD."""
    if isinstance(value, str):
        return value.translate(_SURROGATES)
    if isinstance(value, dict):
        return {_sendable(key): _sendable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_sendable(item) for item in value]
    return value


def _size(value) -> int:
    return len(json.dumps(value, ensure_ascii=False, default=str))


def _elide_input(tool_input: dict) -> dict:
    """A tool input as sent back in an older turn: long strings (or the whole input) replaced by a marker."""
    if _size(tool_input) <= ELIDE_INPUT_CHARS:
        return tool_input
    short = {k: (f"[{len(v)} characters elided]" if isinstance(v, str) and len(v) > 200 else v)
             for k, v in tool_input.items()}
    if _size(short) <= ELIDE_INPUT_CHARS:
        return short
    return {"elided": f"[{_size(tool_input)} characters of input elided]"}


class _Client(anthropic.Anthropic):
    """The SDK's client, with the wait before a retry capped: the SDK honours any retry-after, and an hour's
    (from a proxy, or a rate limit far from its reset) would stall a run silently. Past the cap the retry
    just comes sooner; once retries are spent the run stops resumable with the API's error."""

    def _calculate_retry_timeout(self, *args, **kwargs) -> float:
        return min(super()._calculate_retry_timeout(*args, **kwargs), MAX_RETRY_WAIT)


class ClaudeAgent:
    name = "claude"

    def __init__(self, config: LabConfig, program: str):
        api_key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
        if not api_key:
            raise ConfigError("ANTHROPIC_API_KEY is not set: export it to use the claude agent, or run with "
                              "`--agent offline`")
        self.config = config
        self.model = config.model
        self.program = program.strip() or "(no research program: improve val_bpb)"
        # base_url None: the SDK takes ANTHROPIC_BASE_URL when set, else the public API.
        self.client = _Client(api_key=api_key, base_url=None, max_retries=MAX_RETRIES,
                              timeout=anthropic.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT))
        self.tools = tool_specs()
        preamble = PREAMBLE.format(budget=config.time_budget, trainer_config=config.trainer_config,
                                   max_tool_calls=config.max_tool_calls, keep_rule=config.keep_rule)
        self.system = [{"type": "text", "text": preamble},
                       {"type": "text", "text": self.program, "cache_control": CACHE}]
        self.messages: list[dict] = []

    # -- the loop ------------------------------------------------------------------------------------
    def run(self, toolbox: Toolbox, lab: LabView) -> str:
        session = lab
        self._restart(session, last_turn=None)
        idle = 0
        while not (reason := session.stop_reason()):
            response = self._create()
            tokens_in, tokens_out, cost = usage_cost(self.model, response.usage)
            toolbox.charge(tokens_in, tokens_out, cost)
            content, calls = self._assistant_content(response)
            log.info("agent.response", stop_reason=response.stop_reason, tools=[name for _, name, _ in calls],
                     tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=round(cost, 6))
            if content:
                self.messages.append({"role": "assistant", "content": content})
            if not calls:
                idle += 1
                log.warning("agent.idle", replies=idle, stop_reason=response.stop_reason)
                if idle >= MAX_IDLE_REPLIES:
                    return IDLE_STOP
                self._add_user([{"type": "text", "text": NUDGE}])
                continue
            idle = 0
            results: list[dict] = []
            turn: list[str] = []
            experiment_ran = False
            for call_id, name, raw_input in calls:
                before = session.experiments_run
                result = toolbox.call(name, raw_input)
                experiment_ran |= session.experiments_run > before
                results.append({"type": "tool_result", "tool_use_id": call_id, "content": result.text or "(no output)",
                                "is_error": result.is_error})
                turn.append(self._turn_line(name, raw_input, result))
                if reason := session.stop_reason():
                    return reason
            if experiment_ran:
                self._restart(session, last_turn=turn)
            else:
                self._add_user(results)
        return reason

    def _create(self):
        self._bound()
        messages = self._request_messages()
        try:
            return self.client.messages.create(model=self.model, max_tokens=MAX_TOKENS, system=self.system,
                                               tools=self.tools, messages=messages)
        except anthropic.APIStatusError as exc:
            raise AgentFailed(_reason(self._status_failure(exc))) from None
        except anthropic.APIConnectionError as exc:  # APITimeoutError included
            cause = exc.__cause__ or exc.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause else str(exc)
            what = "timed out" if isinstance(exc, anthropic.APITimeoutError) else "unreachable"
            raise AgentFailed(_reason(f"Anthropic API {what} at {self.client.base_url} ({detail}); "
                                      f"gave up after {MAX_RETRIES} retries")) from None
        except anthropic.APIError as exc:
            raise AgentFailed(_reason(f"Anthropic API: unexpected response: {exc}")) from None

    @staticmethod
    def _status_failure(exc: anthropic.APIStatusError) -> str:
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        kind = error.get("type") or type(exc).__name__
        message = error.get("message") or exc.message
        status = exc.status_code
        retried = status in (408, 409, 429) or status >= 500
        suffix = f" (gave up after {MAX_RETRIES} retries)" if retried else ""
        return f"Anthropic API: HTTP {status} {kind}: {one_line(message, 120, fold=True)}{suffix}"

    @staticmethod
    def _assistant_content(response) -> tuple[list[dict], list[tuple[str, str, object]]]:
        """The reply as content blocks to send back, and its tool calls (id, name, raw input) to execute."""
        content: list[dict] = []
        calls: list[tuple[str, str, object]] = []
        for block in response.content or []:
            kind = getattr(block, "type", None)
            if kind == "text":
                if (getattr(block, "text", "") or "").strip():
                    content.append({"type": "text", "text": _sendable(block.text)})
            elif kind == "tool_use":
                raw_input = getattr(block, "input", None)
                name = str(getattr(block, "name", ""))
                # The API only takes an object as a tool_use input; a malformed one is echoed as {}.
                content.append({"type": "tool_use", "id": block.id, "name": _sendable(name),
                                "input": _sendable(raw_input) if isinstance(raw_input, dict) else {}})
                calls.append((block.id, name, raw_input))
        return content, calls

    # -- the transcript -------------------------------------------------------------------------------
    def _add_user(self, blocks: list[dict]) -> None:
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": "user", "content": list(blocks)})

    def _request_messages(self) -> list[dict]:
        """The transcript with one cache breakpoint: the last block of the latest user message."""
        messages = list(self.messages)
        last = messages[-1]
        content = list(last["content"])
        content[-1] = {**content[-1], "cache_control": CACHE}
        messages[-1] = {**last, "content": content}
        return messages

    def _restart(self, session: LabView, last_turn: list[str] | None) -> None:
        self.messages = [{"role": "user", "content": [{"type": "text", "text": self._summary(session, last_turn)}]}]

    @staticmethod
    def _turn_line(name: str, raw_input: object, result) -> str:
        shown = one_line(json.dumps(raw_input, default=str, ensure_ascii=False) if isinstance(raw_input, dict)
                         else repr(raw_input), 160)
        text = clip(result.text, LAST_TURN_CHARS)
        return _sendable(f"{name} {shown}{' (error)' if result.is_error else ''}:\n{text}")

    def _summary(self, session: LabView, last_turn: list[str] | None) -> str:
        experiments = session.experiments()
        done = [e for e in experiments if e.status != "running"]
        parts = []
        if last_turn is None:
            start = "resumes" if session.resumed else "starts"
            parts.append(f"[labrat] The research session {start}.")
        else:
            parts.append("[labrat] An experiment finished. To keep the context small, the conversation restarts "
                         "from this summary after every experiment; earlier messages are gone.")
        best, base = session.best(), session.base
        if best is not None:
            parts.append(f"Best so far: {history.summary_line(best)}")
        if base is not None:
            same = best is not None and best.id == base.id
            parts.append("The workspace holds that best version." if same else
                         f"The workspace holds the session's base, #{base.id} (val_bpb {history.metric_text(base.metric)}).")
        else:
            parts.append("The workspace holds trainer/train.py as shipped (nothing kept yet in this session).")
        if done:
            counts: dict[str, int] = {}
            for e in done:
                counts[e.status] = counts.get(e.status, 0) + 1
            shown = done[-HISTORY_LINES:]
            header = (f"Lab history: {len(done)} experiment{'s' if len(done) > 1 else ''} ("
                      + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ")"
                      + (f"; the latest {len(shown)}, oldest first:" if len(shown) < len(done) else ":"))
            parts.append("\n".join([header, *(history.summary_line(e) for e in shown)]))
        else:
            parts.append("No experiments yet: a first run_experiment of train.py as shipped gives the baseline.")
        parts.append("More history: list_experiments(limit) for older experiments, show_experiment(id) for one "
                     "experiment's diff and log, diff(a, b) between two (0 = the lab's starting point).")
        if last_turn:
            # Every run_experiment outcome is shown; other results while they fit LAST_TURN_TOTAL_CHARS.
            lines, used, left_out = [], 0, 0
            for line in last_turn:
                if not line.startswith("run_experiment ") and used + len(line) > LAST_TURN_TOTAL_CHARS:
                    left_out += 1
                    continue
                lines.append(line)
                used += len(line)
            if left_out:
                lines.append(f"({left_out} more tool results not shown)")
            parts.append("Your last turn's tool calls and their results:\n" + "\n\n".join(lines))
        if session.config.max_experiments is not None:
            left = session.config.max_experiments - len([e for e in session.session_experiments()
                                                         if e.status != "running"])
            parts.append(f"Experiments left in this session: {max(left, 0)}.")
        parts.append("Next: make one change with a clear hypothesis and call run_experiment.")
        return "\n\n".join(parts)

    def _bound(self) -> None:
        """Elide older tool results (then inputs, then text) until the transcript fits the character budget."""
        before = _size(self.messages)
        if before <= TRANSCRIPT_CHAR_BUDGET:
            return
        results = [b for m in self.messages if m["role"] == "user" for b in m["content"] if b["type"] == "tool_result"]
        uses = [b for m in self.messages if m["role"] == "assistant" for b in m["content"] if b["type"] == "tool_use"]
        texts = [b for m in self.messages[:-2] if m["role"] == "assistant" for b in m["content"] if b["type"] == "text"]
        old_results, old_uses = results[:-KEEP_RECENT_RESULTS], uses[:-KEEP_RECENT_RESULTS]
        for level in range(4):
            if level == 0:  # older tool results and inputs; the latest few stay intact
                for block in old_results:
                    self._elide_result(block)
                for block in old_uses:
                    block["input"] = _elide_input(block["input"])
            elif level == 1:  # every long tool input (a huge string in the latest call too)
                for block in uses:
                    block["input"] = _elide_input(block["input"])
            elif level == 2:  # older reasoning text
                for block in texts:
                    if len(block["text"]) > ELIDE_TEXT_CHARS:
                        block["text"] = block["text"][:ELIDE_TEXT_CHARS] + " [...]"
            else:  # every tool result but the latest
                for block in results[:-1]:
                    self._elide_result(block)
            if _size(self.messages) <= TRANSCRIPT_CHAR_BUDGET:
                break
        log.info("agent.context_elided", chars_before=before, chars_after=_size(self.messages))

    @staticmethod
    def _elide_result(block: dict) -> None:
        content = block["content"]
        if isinstance(content, str) and len(content) > 400 and not content.startswith(ELIDED):
            block["content"] = (f"{ELIDED} {len(content)} characters of this older tool result to keep the context "
                                "bounded; run the tool again if you need it]")
