"""`labrat smoke`: the sandbox alone, end to end (exec, the network, torch, snapshot, restore), timed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from harness.image import build_image
from sandbox.engine import reap_orphans
from sandbox.errors import SandboxError
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from sandbox.snapshots import SnapshotStore

TORCH_CHECK = "python -c 'import torch; a=torch.randn(256,256); print(torch.__version__, float((a@a).abs().mean()) > 0)'"


def run_smoke(runtime: str, on_step: Callable[[str], None] = lambda line: None) -> list[tuple[str, str, float]]:
    """(step, result, seconds) for each step, in order; the snapshots it made are removed."""
    reap_orphans()
    policy = SandboxPolicy(image=build_image(on_step=on_step), runtime=runtime)
    store = SnapshotStore()
    session = f"smoke{int(time.time())}"
    rows: list[tuple[str, str, float]] = []

    def step(name: str, fn):
        started = time.monotonic()
        result = fn()
        shown = (f"{result.name} (depth {result.depth}, {result.layer_bytes} bytes)" if hasattr(result, "layer_bytes")
                 else str(result))
        rows.append((name, shown, time.monotonic() - started))
        return result

    snaps = []
    try:
        with Sandbox.start(policy, session=session) as box:
            step("who am I", lambda: box.exec("id -un").stdout.strip())
            step("network", lambda: box.exec("getent hosts pypi.org >/dev/null && echo reachable || echo none").stdout.strip())
            step("torch in container", lambda: box.exec(TORCH_CHECK, timeout=120).stdout.strip())
            for n in (1, 2):
                box.write_file("notes.txt", f"experiment {n}\n")
                snaps.append(step(f"snapshot #{n}", lambda n=n: store.snapshot(
                    box, labels={"experiment": str(n)}, name=f"{session}-{n}")).name)
        with store.restore(snaps[0], policy, session=session) as restored:
            step("restore #1, read notes.txt", lambda: restored.read_text("notes.txt").strip())
    finally:
        with contextlib.suppress(SandboxError):
            store.gc(keep=[], name_prefix=session)
    return rows
