"""The evaluation's worker: it runs the agent's model and sees only input batches. Fixed: the agent may read
this file, never change it.

    python -m trainer.evaluate --worker SCRATCH_DIR      # how the driver starts one (trainer/evaluate.py)

A worker receives the checkpoint in chunks, loads the model when told (trainer/contract.py says how),
then answers each batch of tokens with logits, one float32 per id of the vocabulary LOAD names. The wire format is here, shared with the driver: a
message is a 4-byte tag and a little-endian uint64 payload size, then the payload. The worker imports
torch; the driver, which imports this module for the format, never does. `ProcessChannel` runs a
worker as a local subprocess (bare use and tests; labrat runs each worker in a fresh container).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from trainer.contract import CHECKPOINT_LIMIT, VOCAB_SIZE, checkpoint_parameters, load_model, read_checkpoint

CHUNK = 1 << 20
STDERR_TAIL_BYTES = 8192
MESSAGE_LIMIT = 4096  # bytes of a worker's error message
REQUEST_LIMIT = 16 * CHUNK  # bytes of one message to a worker (a checkpoint chunk, a batch of tokens)

# Wire format: a message is a 4-byte tag and a little-endian uint64 payload size, then the payload.
HEADER = struct.Struct("<4sQ")
CKPT, END, LOAD, BATCH, READY, LOGITS, FAIL = b"CKPT", b"END.", b"LOAD", b"BTCH", b"REDY", b"LGTS", b"FAIL"
PARAMS = b"PARM"  # the checkpoint's weight count, as a little-endian uint64, sent before the agent's code runs
TOKEN_WIRE = "<u2"  # a batch's tokens: little-endian uint16 (byte ids and BPE ids alike)


def _read_message(stream) -> tuple[bytes, bytes] | None:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    tag, size = HEADER.unpack(header)
    if size > REQUEST_LIMIT:
        raise ValueError(f"a message of {size} bytes")
    payload = stream.read(size)
    return (tag, payload) if len(payload) == size else None


def _write_message(stream, tag: bytes, payload: bytes = b"") -> None:
    stream.write(HEADER.pack(tag, len(payload)) + payload)
    stream.flush()


def worker(scratch: Path) -> int:
    """The worker loop: receive the checkpoint, load the model when told, answer batches with logits.

    The protocol uses private copies of stdin/stdout; fd 1 then points at stderr, so whatever the model
    prints (print(), a C library) lands in the driver's bounded stderr tail, never in an answer."""
    import torch  # first: a worker started ahead of need has imported it by the time the checkpoint comes
    proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    reader = _BufferedReader(proto_in)

    def fail(message: str) -> int:
        _write_message(proto_out, FAIL, message.encode("utf-8", "replace")[:MESSAGE_LIMIT])
        return 3

    path = Path(tempfile.mkdtemp(dir=scratch)) / "ckpt.pt"
    received = 0
    with open(path, "wb") as out:
        while (message := _read_message(reader)) is not None and message[0] == CKPT:
            received += len(message[1])
            if received > CHECKPOINT_LIMIT:
                return fail(f"the checkpoint is over the {CHECKPOINT_LIMIT}-byte limit")
            out.write(message[1])
    if message is None or message[0] != END:
        return 2  # the driver went away, or aborted the transfer
    if (message := _read_message(reader)) is None or message[0] != LOAD:
        return 2  # not needed after all (the driver stopped before this worker's turn)
    request = json.loads(message[1])
    device, vocab_size = request["device"], int(request.get("vocab_size", VOCAB_SIZE))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        state = read_checkpoint(path, device)
        parameters = checkpoint_parameters(state)
    except Exception as exc:
        return fail(f"the checkpoint could not be loaded: {type(exc).__name__}: {exc}")
    # Written before the agent's code runs: whatever it does next, it cannot take this message back.
    _write_message(proto_out, PARAMS, struct.pack("<Q", parameters))
    try:
        model = load_model(state, device)
    except Exception as exc:  # anything the agent's code raises is the model's failure, reported in one line
        return fail(f"the model could not be loaded: {type(exc).__name__}: {exc}")
    _write_message(proto_out, READY)
    with torch.no_grad():
        while (message := _read_message(reader)) is not None and message[0] == BATCH:
            rows, cols = struct.unpack_from("<II", message[1])
            batch = np.frombuffer(message[1], dtype=TOKEN_WIRE, offset=8).reshape(rows, cols)
            try:
                logits = model(torch.from_numpy(batch.astype(np.int64)).to(device))
            except Exception as exc:
                return fail(f"the model's forward pass raised {type(exc).__name__}: {exc}")
            if not isinstance(logits, torch.Tensor):
                return fail(f"the model returned {type(logits).__name__}, expected a tensor of logits")
            if tuple(logits.shape) != (rows, cols, vocab_size):
                return fail(f"the model returned logits of shape {tuple(logits.shape)}, "
                            f"expected {(rows, cols, vocab_size)}")
            if not logits.is_floating_point():
                return fail(f"the model returned {logits.dtype} logits, expected a floating-point tensor")
            data = logits.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()
            proto_out.write(HEADER.pack(LOGITS, len(data)))
            proto_out.write(data)
            proto_out.flush()
    return 0


class _BufferedReader:
    """read(n) that returns n bytes unless the stream ends (a raw pipe returns short reads)."""

    def __init__(self, raw):
        self.raw = raw

    def read(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size:
            chunk = self.raw.read(min(size - got, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)


class ProcessChannel:
    """A worker subprocess (bare use: `python -m trainer.evaluate`, tests). Its stderr is drained on a
    thread into a bounded tail, so a model that floods it can neither block nor exhaust the driver."""

    def __init__(self, argv: list[str], cwd: Path | None = None, user: str | None = None):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=cwd, user=user, start_new_session=True)
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_bytes = 0
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        while chunk := self.proc.stderr.read1(65536):
            self._tail.append(chunk)
            self._tail_bytes += len(chunk)
            while self._tail_bytes - len(self._tail[0]) >= STDERR_TAIL_BYTES:
                self._tail_bytes -= len(self._tail.popleft())

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def read_exact(self, size: int, deadline: float) -> bytes:
        fd, parts, got = self.proc.stdout.fileno(), [], 0
        while got < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(size - got, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def stderr_tail(self) -> str:
        return b"".join(self._tail)[-STDERR_TAIL_BYTES:].decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(self.proc.pid, 9)  # its own session: the model's children go too
            self.proc.wait()
        self._drain.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.close()
