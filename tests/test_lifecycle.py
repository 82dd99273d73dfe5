"""Containers are labelled, removed on close, on Ctrl-C and SIGTERM, and reaped after a SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.engine import LABEL_OWNER_PID, LABEL_ROLE, LABEL_SESSION, client, reap_orphans
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION

ROOT = Path(__file__).parent.parent
HOLDER = """
import signal, sys, time
from sandbox.sandbox import Sandbox, interrupt_on_sigterm
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
interrupt_on_sigterm()
box = Sandbox.start(session=sys.argv[1])
print(box.name, flush=True)
with box:
    time.sleep(600)
"""


def _containers(session: str):
    return client().containers.list(all=True, filters={"label": f"{LABEL_SESSION}={session}"}, ignore_removed=True)


@pytest.fixture
def holder():
    """Starts a process that holds a sandbox; the process is killed (and its container reaped) after the test."""
    procs = []

    def start(session: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, session], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        name = proc.stdout.readline().strip()
        assert name.startswith(f"labrat-{session}-"), name
        return proc, name

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
    reap_orphans()


def test_containers_are_labelled_and_removed_on_close(image):
    box = Sandbox.start(session=SESSION, role="work")
    labels = box.container.labels
    assert labels[LABEL_SESSION] == SESSION and labels[LABEL_ROLE] == "work"
    assert labels[LABEL_OWNER_PID] == str(os.getpid())
    box.close()
    assert not client().containers.list(all=True, filters={"name": box.name})


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_the_container(image, holder, sig):
    session = f"{SESSION}sig{sig.value}"
    proc, name = holder(session)
    assert len(_containers(session)) == 1
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert _containers(session) == []


def test_orphans_of_a_killed_process_are_reaped_and_live_ones_kept(image, holder):
    session = f"{SESSION}kill"
    proc, name = holder(session)
    proc.kill()  # SIGKILL: no handler runs, the container stays behind
    proc.wait(timeout=30)
    assert [c.name for c in _containers(session)] == [name]
    with Sandbox.start(session=SESSION, role="alive") as mine:
        reaped = reap_orphans()
        assert name in reaped
        assert _containers(session) == []
        assert mine.exec("true").exit_code == 0  # our own live sandbox is not an orphan


def test_close_survives_an_engine_that_already_removed_the_container(image):
    box = Sandbox.start(session=SESSION)
    box.container.remove(force=True)
    box.close()
    time.sleep(0)  # nothing to wait for: close must not raise
