"""Shared fixtures: the real Docker engine, the real sandbox image, sandboxes under runc and gVisor."""

import json
import os
import sys
from pathlib import Path

import pytest

from harness import logs
from harness.image import build_image
from sandbox.engine import LABEL_OWNER_PID, client, require_runtime
from sandbox.errors import SandboxError
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox, wait_for_removals
from sandbox.snapshots import SnapshotStore

SESSION = f"pytest{os.getpid()}"
LABRAT = str(Path(sys.executable).parent / "labrat")
# Deterministic and tiny: a run ends after its steps (the time budget is only the host's limit), and the
# same configuration scores the same on every run.
TINY_LAB = dict(deterministic_steps=3, time_budget=60, eval_tokens=1024)


def make_lab(path: Path, **settings) -> Path:
    """A lab directory whose labrat.toml holds TINY_LAB with `settings` over it (None leaves a key out)."""
    path.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in {**TINY_LAB, **settings}.items() if v is not None}
    (path / "labrat.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path
logs.configure(level="warning", json=True)


def _runsc_skip_reason() -> str | None:
    try:
        require_runtime("runsc")
    except SandboxError as exc:
        return f"gVisor cannot run here: {exc}"
    return None


@pytest.fixture(scope="session")
def image() -> str:
    """The CPU sandbox image (built once if missing; `make test` has already built it)."""
    return build_image(on_step=lambda line: None)


@pytest.fixture(scope="session", autouse=True)
def warm_page_cache(image):
    """Import torch once in a container before any test trains. The first import from a freshly built
    image reads torch from disk (seconds on a CI runner), and the tests' budgets of a few seconds are
    all-in: without this, whichever experiment comes first in the suite pays for the cold cache."""
    with Sandbox.start(SandboxPolicy(image=image), session=SESSION, role="warm") as sandbox:
        sandbox.exec(["python", "-c", "import torch, numpy, trainer.train"], timeout=300)


@pytest.fixture(scope="session", autouse=True)
def no_containers_left_behind():
    """After the whole suite, no container started by this test process may remain (once the removals
    still running on the sandbox's background threads have finished)."""
    yield
    wait_for_removals()
    leftovers = client().containers.list(all=True, filters={"label": f"{LABEL_OWNER_PID}={os.getpid()}"},
                                        ignore_removed=True)
    names = [c.name for c in leftovers]
    for container in leftovers:
        container.remove(force=True)
    assert not names, f"containers left behind by the suite: {names}"


@pytest.fixture(params=["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def runtime(request) -> str:
    if request.param == "runsc" and (reason := _runsc_skip_reason()):
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the gVisor tests: {reason}")
        pytest.skip(reason)
    return request.param


@pytest.fixture
def policy(image, runtime) -> SandboxPolicy:
    return SandboxPolicy(image=image, runtime=runtime)


@pytest.fixture
def box(policy):
    with Sandbox.start(policy, session=SESSION) as sandbox:
        yield sandbox


@pytest.fixture
def runc_box(image):
    with Sandbox.start(SandboxPolicy(image=image), session=SESSION) as sandbox:
        yield sandbox


@pytest.fixture
def store():
    """A snapshot store; every snapshot of this test session (names start with SESSION) is removed afterwards."""
    store = SnapshotStore()
    yield store
    store.gc(keep=[], name_prefix=SESSION)
