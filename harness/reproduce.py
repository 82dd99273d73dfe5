"""Re-run a past experiment from its snapshot and compare the metric with the ledger's.

Training runs in a fresh container of the experiment's snapshot (its train.py, exactly as it was)
under the configuration of the session that ran it; evaluation is the same protected evaluation
as in a session. It refuses, with one line, what cannot be a faithful reproduction: a snapshot that
is gone, an evaluator or data that differ from the ones recorded on the snapshot.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import structlog
from pydantic import BaseModel

from harness.config import ConfigError, LabConfig
from harness.data import ensure_data
from harness.image import build_image
from harness.lab import experiment_or_error, open_ledger
from harness.runner import LocalExecutor, evaluator_sha256
from sandbox.errors import SnapshotMissing
from sandbox.snapshots import SnapshotStore

log = structlog.get_logger(__name__)

DEFAULT_TOLERANCE = 0.05  # bpb, for time-budgeted runs (the step count depends on the machine's speed)


class Reproduction(BaseModel):
    experiment_id: int
    description: str
    recorded: float
    reproduced: float | None
    tolerance: float
    deterministic: bool
    ok: bool
    reason: str  # one line: why it passed or failed


def reproduce(lab: Path, experiment_id: int, tolerance: float | None = None,
              on_step: Callable[[str], None] = lambda line: None) -> Reproduction:
    lab = Path(lab)
    with open_ledger(lab) as ledger:
        experiment = experiment_or_error(ledger, experiment_id)
        if experiment.metric is None:
            raise ConfigError(f"experiment #{experiment_id} has no metric to reproduce (it ended as {experiment.status})")
        config = LabConfig(**json.loads(ledger.session(experiment.session_id).config_json))
        store = SnapshotStore()
        # A replicate trained its experiment's snapshot with a seed of its own.
        snapshot_name = experiment.snapshot or (ledger.experiment(experiment.replicate_of).snapshot
                                                if experiment.replicate_of else None)
        try:
            snapshot = store.get(snapshot_name or f"missing-{experiment_id}")
        except SnapshotMissing:
            raise SnapshotMissing(f"experiment #{experiment_id}'s snapshot {snapshot_name} is gone from this "
                                  "engine (garbage-collected?); import it with `labrat import` to reproduce") from None
        recorded_evaluator = snapshot.labels.get("evaluator_sha256")
        if recorded_evaluator is None:
            raise ConfigError(f"experiment #{experiment_id}'s snapshot does not record its evaluator (an older labrat "
                              "made it): it cannot be reproduced faithfully")
        if recorded_evaluator != evaluator_sha256():
            raise ConfigError(
                f"experiment #{experiment_id} was evaluated by evaluator {str(recorded_evaluator)[:12]}, this labrat has "
                f"{evaluator_sha256()[:12]}: a reproduction would not compare like with like (use the labrat version "
                "that ran it)")
        on_step("preparing the image and data")
        data = ensure_data(lab, config, on_step=on_step)
        for label, key in (("data_sha256", "train_sha256"), ("heldout_sha256", "val_sha256")):
            if snapshot.labels.get(label) and snapshot.labels[label] != data.meta.get(key):
                raise ConfigError(f"the lab's data differ from experiment #{experiment_id}'s ({label} mismatch): "
                                  f"check `data`/`seed` in labrat.toml")
        image = build_image(gpu=bool(config.gpus), on_step=on_step)
        runner = LocalExecutor(config, image, data, store, session_id=f"repro{experiment_id}-{secrets.token_hex(2)}")
        deterministic = config.deterministic_steps is not None
        tol = tolerance if tolerance is not None else (0.0 if deterministic else DEFAULT_TOLERANCE)
        on_step(f"training #{experiment_id} from {snapshot.name}")
        trained = runner.train(snapshot, seed=experiment.seed)  # None: an older labrat's row, the lab's seed
        reproduced, reason = None, ""
        if trained.status != "ok":
            reason = f"training {trained.status}: {trained.reason}"
        else:
            on_step(f"evaluating #{experiment_id}")
            evaluated = runner.evaluate(trained, seed=_probe_seed(experiment))
            if not evaluated.ok:
                reason = f"evaluation failed: {evaluated.reason}"
            else:
                reproduced = evaluated.metric
        ok = reproduced is not None and abs(reproduced - experiment.metric) <= tol
        if reproduced is not None:
            delta = reproduced - experiment.metric
            how = "bit-identical" if delta == 0 else f"delta {delta:+.6g}"
            reason = f"{how} (tolerance {tol:g}{', deterministic' if deterministic else ''})"
        result = Reproduction(experiment_id=experiment_id, description=experiment.description,
                              recorded=experiment.metric, reproduced=reproduced, tolerance=tol,
                              deterministic=deterministic, ok=ok, reason=reason)
        ledger.record_event(experiment.session_id, "reproduce", **result.model_dump())
        log.info("experiment.reproduced", id=experiment_id, ok=ok, recorded=experiment.metric, reproduced=reproduced)
        return result


def _probe_seed(experiment) -> int | None:
    """The recorded evaluation's secret draws, so that a deterministic reproduction scores the same rows the
    same way (an older evaluation without one is replayed with fresh draws)."""
    with contextlib.suppress(TypeError, ValueError, KeyError):
        return int(json.loads(experiment.eval_json)["probe_seed"], 16)
    return None


def regress(lab: Path, experiment_id: int | None, baseline: float | None, tolerance: float | None,
            on_step: Callable[[str], None] = lambda line: None) -> tuple[Reproduction, list[str]]:
    """Re-run the best (or the named) experiment; returns the reproduction and the failures (empty: passed).

    A failure is a reproduced metric worse than the recorded one by more than the tolerance, or worse
    than the baseline. A reproduction that comes out *better* is not a regression."""
    if experiment_id is None:
        with open_ledger(lab) as ledger:
            best = ledger.best()
        if best is None:
            raise ConfigError(f"{lab} has no kept experiment to regress")
        experiment_id = best.id
    result = reproduce(lab, experiment_id, tolerance, on_step)
    failures = []
    if result.reproduced is None:
        failures.append(f"#{experiment_id} did not reproduce: {result.reason}")
    else:
        if result.reproduced > result.recorded + result.tolerance:
            failures.append(f"#{experiment_id} regressed: val_bpb {result.reproduced:.6f} vs recorded "
                            f"{result.recorded:.6f} (tolerance {result.tolerance:g})")
        if baseline is not None and result.reproduced > baseline:
            failures.append(f"#{experiment_id} misses the baseline: val_bpb {result.reproduced:.6f} > {baseline:g}")
    return result, failures


def junit_xml(result: Reproduction, failures: list[str], seconds: float) -> str:
    """One JUnit test case per regression check, the format CI systems read."""
    from xml.etree import ElementTree as ET

    suite = ET.Element("testsuite", name="labrat.regress", tests="1", failures=str(int(bool(failures))),
                       errors="0", time=f"{seconds:.3f}")
    case = ET.SubElement(suite, "testcase", classname="labrat.regress", name=f"experiment-{result.experiment_id}",
                         time=f"{seconds:.3f}")
    ET.SubElement(case, "system-out").text = (
        f"{result.description}\nrecorded {result.recorded!r}\nreproduced {result.reproduced!r}\n{result.reason}")
    if failures:
        ET.SubElement(case, "failure", message=failures[0]).text = "\n".join(failures)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
