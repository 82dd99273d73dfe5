"""One experiment's training and protected evaluation, each in a fresh container.

Training runs the candidate snapshot's `train.py` as the agent's user, with the training split
mounted read-only. Its budget is all-in wall clock on the host's clock: train.py is told the
deadline and the host kills the run there, so no experiment gets more time than another.

Evaluation is trainer/evaluate.py's driver, run here in the harness's process: it holds the held-out
tokens, which never enter any container. Its two workers (the scorer, then the judge) each run in a
fresh read-only container of the *sandbox image* (not the snapshot), so nothing the agent planted in
the workspace or home (sitecustomize, .pth files, a patched evaluator) exists there. The checkpoint
(model source + weights) is the only thing that crosses from the agent's world; it streams from the
training container into both workers, never held whole here. The metric is the driver's, computed
from the logits, never anything the agent's code printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import secrets
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel

from harness import failpoints
from harness.config import LabConfig
from harness.data import PreparedData
from harness.image import REPO_ROOT
from harness.text import last_lines
from sandbox.errors import EngineUnavailable, FileMissing, FileTooLarge, PathRefused, SandboxError
from sandbox.policy import WORKSPACE, SandboxPolicy
from sandbox.process import SandboxProcess
from sandbox.sandbox import Sandbox
from sandbox.snapshots import Snapshot, SnapshotStore
from trainer import contract
from trainer import evaluate as ev
from trainer.prepare import TRAIN_DEADLINE_ENV, load_tokens

log = structlog.get_logger(__name__)

TRAIN_DATA = "/data"  # where the training split is mounted, read-only
COMPILE_CACHE_DIR = ".labrat-cache"  # in a training container's workspace: inductor's and Triton's caches, when on
COMPILE_CACHE_ENV = {"TORCHINDUCTOR_CACHE_DIR": f"{WORKSPACE}/{COMPILE_CACHE_DIR}/torchinductor",
                     "TRITON_CACHE_DIR": f"{WORKSPACE}/{COMPILE_CACHE_DIR}/triton"}
WORKER = ["python", "-m", "trainer.evaluate", "--worker", "/tmp"]  # the image's pristine evaluator, as the agent
_READER = ThreadPoolExecutor(2, thread_name_prefix="train-summary")  # summary.json, off the critical path
EVAL_FAILPOINTS = {"scoring": "train.checkpoint_copied", "judging": "eval.running"}  # evaluation phase -> point
LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 4000

EVALUATOR_FILES = ("trainer/__init__.py", "trainer/contract.py", "trainer/prepare.py", "trainer/synthetic.py",
                   "trainer/evaluate.py", "trainer/eval_worker.py")
Phase = Callable[[str, float | None], None]  # progress: (phase name, seconds allowed or None)


@dataclasses.dataclass
class TrainingResult:
    status: Literal["ok", "crash", "timeout"]
    log_tail: str
    seconds: float  # host-clock wall time of the training exec
    peak_memory_bytes: int | None
    reason: str | None = None  # one line, for crash/timeout
    checkpoint: ev.Checkpoint | None = None  # streams ckpt.pt out of the training container, which stays up for it
    box: Sandbox | None = None
    summary_read: Future | None = None  # summary.json, read while the evaluation runs
    compile_cache: Literal["off", "cold", "warm"] = "off"  # whether training found the lab's compile cache
    save_cache: Callable[[Sandbox], None] | None = None  # offers the run's compile cache, then closes the box

    @property
    def summary(self) -> dict | None:
        """The training's own summary.json (untrusted, informational), or None."""
        with contextlib.suppress(SandboxError, ValueError, AttributeError):
            summary = json.loads(self.summary_read.result())
            return summary if isinstance(summary, dict) else None
        return None

    def release(self) -> None:
        """Remove the training container (once the checkpoint has streamed out, or was not needed)."""
        if self.box is not None:
            if self.summary_read is not None:
                futures.wait([self.summary_read])
            if self.save_cache is not None:  # after the checkpoint's stream: closing a spawn ends the user's processes
                self.save_cache(self.box)
            else:
                self.box.close_later()
            self.box = None

    def __enter__(self) -> TrainingResult:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class EvaluationResult(BaseModel):
    ok: bool
    reason: str | None = None
    metric: float | None = None
    floor_gap: float | None = None
    result: dict | None = None
    seconds: float


class _WorkerChannel:
    """One evaluation worker's pipes; closing it ends the worker and removes its container."""

    def __init__(self, box: Sandbox, process: SandboxProcess):
        self.box, self.process = box, process
        self.send, self.read_exact, self.stderr_tail = process.send, process.read_exact, process.stderr_tail

    def close(self) -> None:
        self.process.close()
        self.box.close_later()


class EvalWorkers:
    """The scorer and the judge, each in a fresh container of the sandbox image, started ahead of need (while
    training runs, so that their start and torch's import cost the evaluation nothing)."""

    def __init__(self, channels: dict[str, _WorkerChannel]):
        self.channels = channels

    def take(self, role: str) -> ev.Channel:
        return self.channels.pop(role)

    def close_later(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()


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


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return last_lines(text, lines, LOG_TAIL_CHARS)


class LocalExecutor:
    """Runs experiments on the local Docker engine (harness/experiment.py's Executor): snapshots, trains and
    evaluates under one lab's configuration, and starts its working containers."""

    def __init__(self, config: LabConfig, image: str, data: PreparedData, store: SnapshotStore, session_id: str,
                 compile_cache: Path | None = None, cpuset: str | None = None):
        """`cpuset`: the host cores every container of this executor runs on (a lane's own; None: any)."""
        self.config = config
        # The lab's compile cache (a tar of inductor's and Triton's caches), used when the config turns it on.
        self.compile_cache = compile_cache if config.compile_cache_mb else None
        self._cache_saved: Future | None = None  # the last run's cache, on its way out of its container
        self.image = image
        self.data = data
        self.store = store
        self.session_id = session_id
        self.work_policy = SandboxPolicy(
            image=image, runtime=config.runtime, gpus=config.gpus, memory_bytes=int(config.memory_gb * 1024**3),
            disk_bytes=int(config.disk_gb * 1024**3), cpus=config.cpus, cpuset=cpuset,
            ro_mounts={TRAIN_DATA: str(data.train_dir)},
            file_size_bytes=contract.CHECKPOINT_LIMIT,  # the checkpoint's limit is the same on both sides
        )
        # Evaluation workers hold no data and no capability: a read-only root, so the model can write only the
        # /tmp tmpfs, which is sized to hold the largest checkpoint allowed.
        self.eval_policy = self.work_policy.model_copy(update={
            "ro_mounts": {}, "read_only": True, "tmp_bytes": contract.CHECKPOINT_LIMIT + 256 * 1024**2,
        })
        self._heldout = None

    @property
    def device(self) -> str:
        return "cuda" if self.config.gpus else "cpu"

    @property
    def time_limit(self) -> float:
        """The training run's all-in wall clock on the host: start, data, compile, training and saving."""
        return self.config.time_budget

    def train_command(self, out_dir: str, seed: int | None = None) -> list[str]:
        """`seed`: the run's training seed (the harness's: harness/noise.py's run_seed); None: the lab's seed."""
        cmd = ["python", "-m", "trainer.train", "--config", self.config.trainer_config, "--data", TRAIN_DATA,
               "--out", out_dir, "--device", self.device, "--seed", str(self.config.seed if seed is None else seed)]
        if self.config.deterministic_steps:
            cmd += ["--deterministic", "--steps", str(self.config.deterministic_steps)]
        return cmd

    def start_work_box(self, snapshot: Snapshot | str | None) -> Sandbox:
        """A working container of a snapshot, or of the sandbox image for None."""
        if snapshot is None:
            return Sandbox.start(self.work_policy, session=self.session_id, role="work")
        return self.store.restore(snapshot, self.work_policy, session=self.session_id, role="work")

    def snapshot(self, box: Sandbox, name: str, labels: dict[str, str]) -> Snapshot:
        return self.store.snapshot(box, name=name, labels=labels)

    def provenance(self) -> dict[str, str]:
        return {"trainer_config": self.config.trainer_config, "seed": str(self.config.seed),
                "data_sha256": self.data.meta.get("train_sha256", ""), "heldout_sha256": self.data.meta.get("val_sha256", ""),
                "evaluator_sha256": evaluator_sha256(), "config": self.config.model_dump_json()}

    # -- training ----------------------------------------------------------------------------------
    def train(self, snapshot: Snapshot, phase: Phase = lambda name, seconds: None,
              timings: dict[str, float] | None = None, on_start: Callable[[], None] = lambda: None,
              seed: int | None = None) -> TrainingResult:
        """Train the snapshot's train.py in a fresh container of its base image; `on_start` runs once that
        container is up (the caller starts work that can overlap training then, not earlier: the engine starts
        containers one at a time). When training succeeded, the result's container stays up until release(): the
        checkpoint streams from it into the evaluation."""
        out_dir = f"{WORKSPACE}/.labrat-run-{secrets.token_hex(4)}"  # fresh: an old ckpt.pt can never be picked up
        limit = self.time_limit
        timings = {} if timings is None else timings
        with timed(timings, "train_start"):
            try:
                source = self.store.read_file(snapshot, f"{WORKSPACE}/{contract.TRAIN_SOURCE}",
                                              contract.TRAIN_SOURCE_LIMIT, session=self.session_id)
            except (FileMissing, PathRefused, FileTooLarge) as exc:
                return TrainingResult(status="crash", log_tail="", seconds=0.0, peak_memory_bytes=None,
                                      reason=f"nothing to train: {exc} (training receives {contract.TRAIN_SOURCE} "
                                             f"alone, a regular file of at most {contract.TRAIN_SOURCE_LIMIT} bytes)")
            # A fresh container of the snapshot's base image (the pristine sandbox image it stands on, so a rerun a
            # month later trains on the same software) with only the candidate's train.py in it: nothing else the
            # agent wrote (other files, its home, weights trained outside the budget) reaches training.
            pristine = self.work_policy.model_copy(update={"image": snapshot.base_id})
            box = Sandbox.start(pristine, session=self.session_id, role="train")
        failpoints.reach("train.container_started")
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(box.close_later)
            box.write_file(contract.TRAIN_SOURCE, source)
            with timed(timings, "train_start"):
                cache = self._load_compile_cache(box)
            phase("training", limit)
            on_start()
            failpoints.reach("train.running")
            # The deadline is the host's: train.py is told it, and the host kills the run there, not later.
            env = {TRAIN_DEADLINE_ENV: f"{time.time() + limit:.3f}", **(COMPILE_CACHE_ENV if cache != "off" else {})}
            with timed(timings, "train"):
                run = box.exec(self.train_command(out_dir, seed), timeout=limit, env=env)
            failpoints.reach("train.finished")
            log_text = run.stdout + ("\n" + run.stderr if run.stderr.strip() else "")
            base = dict(log_tail=tail(log_text), seconds=round(run.duration, 3), peak_memory_bytes=box.peak_memory_bytes(),
                        compile_cache=cache)
            if run.limit == "timeout":
                return TrainingResult(status="timeout", reason=f"training ran past its {limit:g} s budget (all-in, "
                                      "host clock) and was killed", **base)
            if run.limit in ("memory", "died", "disk"):
                why = {"memory": f"out of memory at the {self.config.memory_gb:g} GB limit",
                       "died": "the training container stopped unexpectedly",
                       "disk": "training wrote past the disk limit"}[run.limit]
                return TrainingResult(status="crash", reason=why, **base)
            if run.exit_code != 0:
                last = tail(run.stderr or run.stdout, lines=1) or f"exit code {run.exit_code}"
                return TrainingResult(status="crash", reason=f"training failed (exit {run.exit_code}): {last}", **base)
            cleanup.pop_all()  # the container outlives this block: the checkpoint streams from it
        checkpoint = ev.Checkpoint(lambda: _checkpoint_chunks(box, f"{out_dir}/ckpt.pt"))
        return TrainingResult(status="ok", checkpoint=checkpoint, box=box, **base,
                              summary_read=_READER.submit(box.read_text, f"{out_dir}/summary.json", 1 << 20),
                              save_cache=self._offer_compile_cache if cache != "off" else None)

    # -- the compile cache -------------------------------------------------------------------------
    # Opt-in (compile_cache_mb): it saves GPU runs their compile time, but it is a channel between training runs
    # (bounded by its size) and makes budgets unequal (a warm run trains longer): docs/security.md says more.
    # It is copied in and out, never mounted: a training run sees a copy and can only offer a new one, which the
    # harness keeps only when it fits the bound; regular files only, never into an evaluation.
    def _load_compile_cache(self, box: Sandbox) -> Literal["off", "cold", "warm"]:
        if self.compile_cache is None:
            return "off"
        self.wait_for_compile_cache()  # the previous run's offer first: runs see each other's caches in order
        if not self.compile_cache.exists():
            return "cold"
        try:
            box.unpack_dir(COMPILE_CACHE_DIR, _file_chunks(self.compile_cache), self.config.compile_cache_mb * 1024**2)
        except EngineUnavailable:
            raise
        except SandboxError as exc:  # a corrupt or oversized cache is dropped, and this run compiles cold
            log.warning("compile_cache.unusable", path=str(self.compile_cache), error=str(exc))
            self.compile_cache.unlink(missing_ok=True)
            return "cold"
        return "warm"

    def wait_for_compile_cache(self) -> None:
        """Until the last training run's offer of its cache has been kept or refused."""
        if self._cache_saved is not None:
            futures.wait([self._cache_saved])

    def _offer_compile_cache(self, box: Sandbox) -> None:
        """In the background: the run's compile cache replaces the lab's when it fits the bound (else the old one
        stays); then the training container goes."""
        self._cache_saved = _READER.submit(_save_then_close, self._save_compile_cache, box)

    def _save_compile_cache(self, box: Sandbox) -> None:
        partial = self.compile_cache.with_name(f"{self.compile_cache.name}.{secrets.token_hex(4)}.partial")
        try:
            self.compile_cache.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as out:
                for chunk in box.pack_dir(COMPILE_CACHE_DIR, self.config.compile_cache_mb * 1024**2):
                    out.write(chunk)
            partial.replace(self.compile_cache)
        except (SandboxError, OSError) as exc:
            log.info("compile_cache.not_kept", error=str(exc))
        finally:
            partial.unlink(missing_ok=True)

    # -- evaluation --------------------------------------------------------------------------------
    def start_eval_workers(self) -> EvalWorkers:
        """Two fresh containers of the sandbox image, each with a worker started (it imports torch, then waits
        for the checkpoint). Started early, while training runs."""
        channels: dict[str, _WorkerChannel] = {}
        try:
            for role in ("score", "judge"):
                box = Sandbox.start(self.eval_policy, session=self.session_id, role=f"eval-{role}")
                channels[role] = _WorkerChannel(box, box.spawn(WORKER))
        except BaseException:
            EvalWorkers(channels).close_later()
            raise
        return EvalWorkers(channels)

    def heldout_tokens(self):
        if self._heldout is None:
            self._heldout = load_tokens(self.data.heldout_dir / "val.bin", self.data.meta.get("val_sha256"),
                                        self.data.meta.get("token_dtype", "uint8"))
        return self._heldout

    def evaluate(self, trained: TrainingResult, phase: Phase = lambda name, seconds: None,
                 timings: dict[str, float] | None = None, workers: EvalWorkers | None = None,
                 seed: int | None = None) -> EvaluationResult:
        """Score the trained checkpoint with trainer/evaluate.py's driver, here in the harness, its workers in
        fresh containers; then remove the training container. `seed` replays a recorded evaluation."""
        timings = {} if timings is None else timings
        seq_len = contract.EVAL_SEQ_LENS[self.config.trainer_config]  # fixed per size class
        started = time.monotonic()
        try:
            if workers is None:
                with timed(timings, "eval_start"):
                    workers = self.start_eval_workers()
            phase("evaluating", self.config.eval_timeout)
            failpoints.reach("eval.started")
            with timed(timings, "eval"):
                result = ev.evaluate(
                    trained.checkpoint, self.heldout_tokens(), self.device, self.config.eval_tokens, seq_len,
                    spawn=workers.take, attainable=ev.attainable_for(self.data.meta, seq_len), seed=seed,
                    timeout=self.config.eval_timeout, answer_timeout=self.config.eval_timeout,
                    on_phase=lambda name: failpoints.reach(EVAL_FAILPOINTS[name]) if name in EVAL_FAILPOINTS else None,
                    **ev.tokenization(self.data.meta))
        except ev.EvaluationError as exc:
            return EvaluationResult(ok=False, reason=str(exc), seconds=round(time.monotonic() - started, 3))
        finally:
            if workers is not None:
                workers.close_later()
            trained.release()
        floor = self.data.floor_bpb
        result["floor_bpb"] = floor
        return EvaluationResult(ok=True, metric=result["val_bpb"], result=result,
                                floor_gap=result["val_bpb"] - floor if floor is not None else None,
                                seconds=round(time.monotonic() - started, 3))


def _save_then_close(save: Callable[[Sandbox], None], box: Sandbox) -> None:
    try:
        save(box)
    finally:
        box.close_later()


def _file_chunks(path: Path, size: int = 1 << 20):
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _checkpoint_chunks(box: Sandbox, path: str):
    """ckpt.pt out of the training container, chunk by chunk; a missing, planted or oversized one is the
    experiment's failure (a lost engine is the harness's, and propagates)."""
    try:
        yield from box.stream_file(path, contract.CHECKPOINT_LIMIT)
    except (FileMissing, PathRefused, FileTooLarge) as exc:
        raise ev.EvaluationError(f"training wrote no usable checkpoint: {exc}") from None
