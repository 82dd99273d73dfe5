"""One experiment's training and protected evaluation, each in a fresh container.

Training runs the candidate snapshot's `train.py` as the agent's user, with the training split
mounted read-only and the host's clock killing it at budget + grace. Evaluation runs in a fresh
container of the *sandbox image* (not the snapshot): its trainer/evaluate.py is the pristine
root-owned copy and nothing the agent planted in the workspace or home (sitecustomize, .pth
files, a patched evaluator) exists there. The checkpoint (model source + weights) is the only
thing that crosses from the agent's world; the driver runs as root with the held-out tokens in a
root-only file and runs the model as the agent's user, which cannot read them. The metric is the
driver's result file, never anything the agent's code printed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import secrets
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import structlog
from pydantic import BaseModel

from harness import failpoints
from harness.config import LabConfig
from harness.data import PreparedData
from sandbox.errors import SandboxError
from sandbox.images import REPO_ROOT
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from sandbox.snapshots import Snapshot, SnapshotStore

log = structlog.get_logger(__name__)

TRAIN_DATA = "/data"  # where the training split is mounted, read-only
EVAL_DIR = "/tmp/eval"  # root-owned, mode 711 in the evaluation container: the model may open ckpt.pt only
EVAL_SEQ_LEN = {"cpu-tiny": 128, "gpu": 2048}  # fixed per size class, so results stay comparable
CHECKPOINT_LIMIT = 4 * 1024**3
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000

EVALUATOR_FILES = ("trainer/__init__.py", "trainer/prepare.py", "trainer/evaluate.py")
Phase = Callable[[str, float | None], None]  # progress: (phase name, seconds allowed or None)


class TrainingResult(BaseModel):
    status: Literal["ok", "crash", "timeout"]
    reason: str | None = None  # one line, for crash/timeout
    log_tail: str
    seconds: float  # host-clock wall time of the training exec
    peak_memory_bytes: int | None
    summary: dict | None = None  # the training's own summary.json (untrusted, informational)
    checkpoint: bytes | None = None


class EvaluationResult(BaseModel):
    ok: bool
    reason: str | None = None
    metric: float | None = None
    floor_gap: float | None = None
    result: dict | None = None
    seconds: float


@functools.cache
def evaluator_sha256() -> str:
    """Hash of the evaluation code (the image's root-owned copy is built from these files): a result is
    reproducible only under the evaluator that produced it."""
    digest = hashlib.sha256()
    for name in EVALUATOR_FILES:
        digest.update(name.encode() + b"\0" + (REPO_ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    """Add the block's wall-clock seconds to timings[name] (the per-phase breakdown in the ledger)."""
    started = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.monotonic() - started, 4)


def tail(text: str, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-chars:]


class Runner:
    """Trains and evaluates snapshots under one lab's configuration."""

    def __init__(self, config: LabConfig, image: str, data: PreparedData, store: SnapshotStore, session_id: str):
        self.config = config
        self.image = image
        self.data = data
        self.store = store
        self.session_id = session_id
        self.work_policy = SandboxPolicy(
            image=image, runtime=config.runtime, gpus=config.gpus, memory_bytes=int(config.memory_gb * 1024**3),
            disk_bytes=int(config.disk_gb * 1024**3), cpus=config.cpus, ro_mounts={TRAIN_DATA: str(data.train_dir)},
        )
        # The driver needs SETUID/SETGID to run the model as the agent's user and KILL to stop it; the
        # agent's code never runs as root here. /tmp holds the checkpoint and the held-out tokens.
        self.eval_policy = self.work_policy.model_copy(update={
            "ro_mounts": {}, "cap_add": ("SETUID", "SETGID", "KILL"), "kill_leftovers": False,
            "tmp_bytes": max(self.work_policy.tmp_bytes, 2 * 1024**3),
        })

    @property
    def device(self) -> str:
        return "cuda" if self.config.gpus else "cpu"

    def train_command(self, out_dir: str) -> list[str]:
        cmd = ["python", "-m", "trainer.train", "--config", self.config.trainer_config, "--data", TRAIN_DATA,
               "--out", out_dir, "--device", self.device, "--seed", str(self.config.seed)]
        if self.config.deterministic_steps:
            cmd += ["--deterministic", "--steps", str(self.config.deterministic_steps)]
        else:
            cmd += ["--time-budget", f"{self.config.time_budget:g}"]
        return cmd

    # -- training ----------------------------------------------------------------------------------
    def train(self, snapshot: Snapshot, phase: Phase = lambda name, seconds: None,
              timings: dict[str, float] | None = None, on_start: Callable[[], None] = lambda: None) -> TrainingResult:
        """Train in a fresh container of the snapshot; `on_start` runs once that container is up (the
        caller starts work that can overlap training then, not earlier: the engine starts containers
        one at a time)."""
        out_dir = f"/workspace/.labrat-run-{secrets.token_hex(4)}"  # fresh: an old ckpt.pt can never be picked up
        limit = self.config.time_budget + self.config.grace
        timings = {} if timings is None else timings
        with timed(timings, "train_start"):
            box = self.store.restore(snapshot, self.work_policy, session=self.session_id, role="train")
        failpoints.reach("train.container_started")
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(box.close_later)
            phase("training", limit)
            on_start()
            failpoints.reach("train.running")
            with timed(timings, "train"):
                run = box.exec(self.train_command(out_dir), timeout=limit)
            failpoints.reach("train.finished")
            seconds = run.duration
            log_text = run.stdout + ("\n" + run.stderr if run.stderr.strip() else "")
            peak = box.peak_memory_bytes()
            base = dict(log_tail=tail(log_text), seconds=round(seconds, 3), peak_memory_bytes=peak)
            if run.limit == "timeout":
                return TrainingResult(status="timeout", reason=f"training ran past {limit:g} s (budget + grace) and was killed", **base)
            if run.limit in ("memory", "died", "disk"):
                why = {"memory": f"out of memory at the {self.config.memory_gb:g} GB limit",
                       "died": "the training container stopped unexpectedly",
                       "disk": "training wrote past the disk limit"}[run.limit]
                return TrainingResult(status="crash", reason=why, **base)
            if run.exit_code != 0:
                last = tail(run.stderr or run.stdout, lines=1) or f"exit code {run.exit_code}"
                return TrainingResult(status="crash", reason=f"training failed (exit {run.exit_code}): {last}", **base)
            with timed(timings, "copy_out"), ThreadPoolExecutor(1) as pool:
                summary_read = pool.submit(box.read_text, f"{out_dir}/summary.json", 1 << 20)
                try:
                    checkpoint = box.read_file(f"{out_dir}/ckpt.pt", max_bytes=CHECKPOINT_LIMIT)
                except SandboxError as exc:
                    return TrainingResult(status="crash", reason=f"training wrote no usable checkpoint: {exc}", **base)
                failpoints.reach("train.checkpoint_copied")
                summary = None
                with contextlib.suppress(SandboxError, ValueError):
                    summary = json.loads(summary_read.result())
                    summary = summary if isinstance(summary, dict) else None
        return TrainingResult(status="ok", checkpoint=checkpoint, summary=summary, **base)

    # -- evaluation --------------------------------------------------------------------------------
    def start_eval_box(self) -> Sandbox:
        """A fresh container of the sandbox image for one evaluation (started early, while training runs)."""
        return Sandbox.start(self.eval_policy, session=self.session_id, role="eval")

    def evaluate(self, checkpoint: bytes, phase: Phase = lambda name, seconds: None,
                 timings: dict[str, float] | None = None, box: Sandbox | None = None) -> EvaluationResult:
        timings = {} if timings is None else timings
        files = {"ckpt.pt": (checkpoint, 0o644), **{n: (d, 0o600) for n, d in self.data.eval_files(self.config.eval_tokens).items()}}
        seq_len = EVAL_SEQ_LEN[self.config.trainer_config]
        # One exec: unpack the files root-only (the model may open ckpt.pt, nothing else), then run the
        # driver. Its stdout ends with the result line; the worker's output goes to the driver's pipes only.
        script = (f"mkdir -m 711 {EVAL_DIR} && tar -x -f - -C {EVAL_DIR} && exec python -m trainer.evaluate "
                  f"--checkpoint {EVAL_DIR}/ckpt.pt --data {EVAL_DIR} --eval-tokens {self.config.eval_tokens} "
                  f"--seq-len {seq_len} --device {self.device} --worker-user {self.work_policy.user}")
        if box is None:
            with timed(timings, "eval_start"):
                box = self.start_eval_box()
        try:
            phase("evaluating", self.config.eval_timeout)
            failpoints.reach("eval.started")
            failpoints.reach("eval.running")
            with timed(timings, "eval"):
                run = box.exec(script, input=_tar(files), user="root", timeout=self.config.eval_timeout)
        finally:
            box.close_later()
        seconds = round(run.duration, 3)
        if run.limit:
            reason = {"timeout": f"evaluation ran past {self.config.eval_timeout:g} s"}.get(
                run.limit, f"evaluation stopped: {run.limit}")
            return EvaluationResult(ok=False, reason=reason, seconds=seconds)
        try:
            result = json.loads(run.stdout.strip().splitlines()[-1])
            assert isinstance(result, dict)
        except (ValueError, IndexError, AssertionError):
            last = tail(run.stderr, lines=1) or f"exit code {run.exit_code}"
            return EvaluationResult(ok=False, reason=f"evaluation failed: {last}", seconds=seconds)
        if "val_bpb" not in result:
            return EvaluationResult(ok=False, reason=str(result.get("error", "no metric")), result=result, seconds=seconds)
        return EvaluationResult(ok=True, metric=result["val_bpb"], floor_gap=result.get("gap_bpb"), result=result,
                                seconds=seconds)


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A tar of root-owned files with the given modes (extracted by root, ownership and modes are kept)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, 0, 0, int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
