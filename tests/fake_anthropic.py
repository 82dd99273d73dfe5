"""A fake Anthropic Messages API: a real HTTP server on 127.0.0.1 for the real `anthropic` SDK.

It answers POST /v1/messages from a script of steps, one per request it accepts:

    fake.script(
        reply(tool("bash", {"command": "ls"}), text="Let me look."),   # a message with tool_use blocks
        error(529),                                                    # an Anthropic-style error, retry-after-ms: 10
        drop(),                                                        # the connection closes with no response
        hang(60),                                                      # accepted, no answer for 60 s, then dropped
        lambda request: reply(...),                                    # a step computed from the request body
    )

When the script runs out it replies end_turn with no tool use. It checks each request the way the
API would (tool_use ids answered by tool_result blocks in the next message, no empty text, at most
4 cache breakpoints, the test key in x-api-key or Authorization: Bearer) and answers 400/401 when one is wrong; those answers are
kept in `violations`. Every request (body, headers, time) and every answer is recorded.

Use it through the `fake_anthropic` fixture, which also points ANTHROPIC_BASE_URL at it and sets a
random test ANTHROPIC_API_KEY (`fake.api_key`).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

RETRY_AFTER_MS = 10
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error"}
ERROR_MESSAGES = {429: "Number of request tokens has exceeded your per-minute rate limit", 500: "Internal server error",
                  529: "Overloaded"}


def tool(name: str, tool_input: object) -> dict:
    """One tool call of a scripted reply (the input may be anything, to script malformed calls)."""
    return {"name": name, "input": tool_input}


@dataclass
class Reply:
    calls: list[dict]
    text: str | None = None
    stop_reason: str | None = None  # default: tool_use when there are calls, else end_turn
    usage: dict | None = None  # default: estimated from the request, with the cache emulated


@dataclass
class Error:
    status: int
    kind: str | None = None
    message: str | None = None
    headers: dict = field(default_factory=lambda: {"retry-after-ms": str(RETRY_AFTER_MS)})


@dataclass
class Drop:
    """Close the connection without answering (the SDK sees a connection error)."""


@dataclass
class Hang:
    """Accept the request and answer nothing for `seconds` (the SDK's read timeout should fire first), then
    close the connection. Stopping the server ends every hang at once."""
    seconds: float


def reply(*calls: dict, text: str | None = None, stop_reason: str | None = None, usage: dict | None = None) -> Reply:
    return Reply(list(calls), text, stop_reason, usage)


def end_turn(text: str = "I think I am done.") -> Reply:
    return Reply([], text, "end_turn")


def error(status: int, kind: str | None = None, message: str | None = None, headers: dict | None = None) -> Error:
    """An error answer; `headers` replaces the default retry-after-ms: 10 ({} for none: the SDK backs off)."""
    return Error(status, kind, message) if headers is None else Error(status, kind, message, headers)


def drop() -> Drop:
    return Drop()


def hang(seconds: float) -> Hang:
    return Hang(seconds)


Step = Reply | Error | Drop | Hang | Callable[[dict], "Reply | Error | Drop | Hang"]


@dataclass
class Request:
    body: dict
    raw: bytes
    headers: dict[str, str]  # lower-case names
    at: float  # time.monotonic() when it arrived

    @property
    def api_key(self) -> str | None:
        """The credential sent: x-api-key, or the Authorization bearer token (how SDK 2.x sends an api_key)."""
        if "x-api-key" in self.headers:
            return self.headers["x-api-key"]
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme.lower() == "bearer" else None


def _tokens(value) -> int:
    return max(1, len(json.dumps(value)) // 4)


def _strip_cache(value):
    if isinstance(value, dict):
        return {k: _strip_cache(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_cache(v) for v in value]
    return value


def _count_cache(value) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(_count_cache(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_cache(v) for v in value)
    return 0


# Anthropic-defined tool types the fake API accepts, with the name each must have (the API's own rule).
ANTHROPIC_DEFINED_TOOLS = {"bash_20250124": "bash", "text_editor_20250124": "str_replace_editor",
                           "text_editor_20250429": "str_replace_based_edit_tool",
                           "text_editor_20250728": "str_replace_based_edit_tool"}


def check_request(body: dict) -> str | None:
    """What the real API would refuse in this request body (a 400's message), or None."""
    if not isinstance(body.get("model"), str) or not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return "model and max_tokens are required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages: first message must use the \"user\" role"
    for tool_spec in body.get("tools") or []:
        kind = tool_spec.get("type", "custom")
        if kind in ANTHROPIC_DEFINED_TOOLS:  # the schema is the API's: a name it fixes, and no input_schema
            if tool_spec.get("name") != ANTHROPIC_DEFINED_TOOLS[kind] or "input_schema" in tool_spec:
                return f"tools: a {kind} tool must be named {ANTHROPIC_DEFINED_TOOLS[kind]!r} and has no input_schema"
        elif kind != "custom" or not tool_spec.get("name") or not isinstance(tool_spec.get("input_schema"), dict):
            return "tools: each custom tool needs a name and an input_schema"
    for block in body.get("system") or []:
        if block.get("type") != "text" or not block.get("text"):
            return "system: text content blocks must be non-empty"
    if _count_cache(body) > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {_count_cache(body)}."
    pending: list[str] = []  # tool_use ids of the previous assistant message
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: must be user or assistant"
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list) or not blocks:
            return f"messages.{i}: content must be a non-empty list"
        answered = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        if pending and (role != "user" or set(answered) != set(pending)):
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(sorted(set(pending) - set(answered)))}")
        if not pending and answered:
            return f"messages.{i}: unexpected `tool_use_id` found in `tool_result` blocks: {answered[0]}"
        pending = []
        for j, block in enumerate(blocks):
            kind = block.get("type")
            if kind == "text" and not block.get("text"):
                return f"messages.{i}.content.{j}: text content blocks must be non-empty"
            if kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("input"), dict) or not block.get("id"):
                    return f"messages.{i}.content.{j}.tool_use: input must be an object, from the assistant"
                pending.append(block["id"])
            if kind == "tool_result" and not isinstance(block.get("content"), (str, list)):
                return f"messages.{i}.content.{j}.tool_result: content must be a string or a list"
    if pending:
        return "the last message cannot be an assistant message with tool_use blocks"
    return None


class FakeAnthropic:
    def __init__(self, api_key: str | None = None):
        self.api_key = api_key
        self.steps: list[Step] = []
        self.requests: list[Request] = []  # every POST /v1/messages, including refused and failed ones
        self.answers: list[tuple[int, dict | None]] = []  # (status, body) per request; (0, None) for a drop,
        # (-1, None) for a hang
        self.violations: list[str] = []
        self._lock = threading.Lock()
        self._cached: set[str] = set()
        self._last_cached_messages: list = []
        self._ids = 0
        self._server: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()

    # -- scripting -----------------------------------------------------------------------------------
    def script(self, *steps: Step) -> FakeAnthropic:
        with self._lock:
            self.steps.extend(steps)
        return self

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def replies(self) -> list[dict]:
        """The message bodies of the successful answers, in order."""
        return [body for status, body in self.answers if status == 200]

    def tool_results(self) -> dict[str, dict]:
        """tool_use id -> the tool_result block the agent sent for it, as first sent (before any elision)."""
        found: dict[str, dict] = {}
        for request in self.requests:
            for message in request.body.get("messages", []):
                if isinstance(message.get("content"), list):
                    for block in message["content"]:
                        if block.get("type") == "tool_result":
                            found.setdefault(block["tool_use_id"], block)
        return found

    def calls(self) -> list[dict]:
        """Every tool_use block this server sent, in order."""
        return [b for body in self.replies for b in body["content"] if b["type"] == "tool_use"]

    # -- serving -------------------------------------------------------------------------------------
    def start(self) -> FakeAnthropic:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if self.path.split("?")[0] != "/v1/messages":
                    return self._send(404, _error_body(404, "not_found_error", f"no route {self.path}"))
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self._send(400, _error_body(400, "invalid_request_error", "body is not JSON"))
                request = Request(body, raw, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                status, answer, headers = fake._answer(request)
                if status == -1:  # hang: no response for a while (the lock is not held meanwhile), then none at all
                    fake._stopping.wait(headers["seconds"])
                    self.close_connection = True
                    return None
                if status == 0:  # drop: no response at all
                    self.close_connection = True
                    return None
                return self._send(status, answer, headers)

            def _send(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("request-id", f"req_{secrets.token_hex(8)}")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="fake-anthropic", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- answering -----------------------------------------------------------------------------------
    def _answer(self, request: Request) -> tuple[int, dict | None, dict]:
        with self._lock:
            self.requests.append(request)
            if self.api_key is not None and request.api_key != self.api_key:
                return self._record(401, _error_body(401, "authentication_error", "invalid x-api-key"), {})
            if problem := check_request(request.body):
                self.violations.append(problem)
                return self._record(400, _error_body(400, "invalid_request_error", problem), {})
            step = self.steps.pop(0) if self.steps else end_turn()
            if callable(step):
                step = step(request.body)
            if isinstance(step, Drop):
                return self._record(0, None, {})
            if isinstance(step, Hang):
                self.answers.append((-1, None))
                return -1, None, {"seconds": step.seconds}
            if isinstance(step, Error):
                kind = step.kind or ERROR_TYPES.get(step.status, "api_error")
                message = step.message or ERROR_MESSAGES.get(step.status, "error")
                return self._record(step.status, _error_body(step.status, kind, message), step.headers)
            return self._record(200, self._message(request.body, step), {})

    def _record(self, status: int, body: dict | None, headers: dict) -> tuple[int, dict | None, dict]:
        self.answers.append((status, body))
        return status, body, headers

    def _message(self, body: dict, step: Reply) -> dict:
        content: list[dict] = []
        if step.text:
            content.append({"type": "text", "text": step.text})
        for call in step.calls:
            self._ids += 1
            content.append({"type": "tool_use", "id": f"toolu_{self._ids:04d}{secrets.token_hex(6)}",
                            "name": call["name"], "input": call["input"]})
        return {
            "id": f"msg_{secrets.token_hex(12)}", "type": "message", "role": "assistant", "model": body["model"],
            "content": content, "stop_reason": step.stop_reason or ("tool_use" if step.calls else "end_turn"),
            "stop_sequence": None, "usage": step.usage or self._usage(body, content),
        }

    def _usage(self, body: dict, content: list[dict]) -> dict:
        """Token counts in the API's shape, with prompt caching emulated from the cache_control markers."""
        fresh = written = read = 0
        system = body.get("system") or []
        prefix = {"tools": body.get("tools"), "system": _strip_cache(system)}
        if system and isinstance(system, list) and "cache_control" in system[-1]:
            key = json.dumps(prefix, sort_keys=True)
            if key in self._cached:
                read += _tokens(prefix)
            else:
                self._cached.add(key)
                written += _tokens(prefix)
        else:
            fresh += _tokens(prefix)
        messages = body["messages"]
        last = messages[-1].get("content")
        stripped = _strip_cache(messages)
        if isinstance(last, list) and last and "cache_control" in last[-1]:
            previous = self._last_cached_messages
            if previous and stripped[: len(previous)] == previous:
                read += _tokens(previous)
                written += max(1, _tokens(stripped) - _tokens(previous))
            else:
                written += _tokens(stripped)
            self._last_cached_messages = stripped
        else:
            fresh += _tokens(stripped)
        return {"input_tokens": fresh + 5, "output_tokens": _tokens(content) + 10,
                "cache_creation_input_tokens": written, "cache_read_input_tokens": read}


def _error_body(status: int, kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": f"req_{secrets.token_hex(8)}"}


@pytest.fixture
def fake_anthropic(monkeypatch):
    """A running fake API; ANTHROPIC_BASE_URL points at it and ANTHROPIC_API_KEY is a fresh test key."""
    key = f"sk-ant-test-{secrets.token_hex(16)}"
    with FakeAnthropic(api_key=key) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", key)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
        monkeypatch.setenv("NO_PROXY", ",".join(filter(None, ["127.0.0.1", "localhost", os.environ.get("NO_PROXY")])))
        yield fake
