"""The `labrat` command line. Errors the user can act on are printed as one line, never a traceback."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harness import logs
from harness.config import ConfigError
from sandbox.errors import SandboxError
from sandbox.sandbox import interrupt_on_sigterm

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Run ML research agents in hardened, snapshotted containers.")
image_app = typer.Typer(no_args_is_help=True, help="Build the sandbox images (offline).")
app.add_typer(image_app, name="image")
console = Console(stderr=True)
out = Console()


@contextlib.contextmanager
def _status(message: str):
    """A rich spinner whose text follows the steps of a long job."""
    with console.status(message) as status:
        def update(line: str) -> None:
            status.update(line[:120])
            if not console.is_terminal:  # no spinner in a log file or CI: keep each step as a line
                console.log(line[:160], highlight=False)
        yield update


@image_app.command("build")
def image_build(
    gpu: Annotated[bool, typer.Option("--gpu", help="Build Dockerfile.gpu (CUDA base) instead of the CPU image.")] = False,
    base: Annotated[str | None, typer.Option(help="Base image (default: a debootstrap'd Debian for CPU, a CUDA PyTorch image for GPU).")] = None,
    tag: Annotated[str | None, typer.Option(help="Tag of the built image.")] = None,
) -> None:
    """Build labrat-sandbox:cpu (or :gpu); skipped when an identical build exists."""
    from sandbox.images import build_image

    with _status("building image") as update:
        name = build_image(gpu=gpu, base=base, tag=tag, progress=update)
    out.print(f"image ready: {name}")


@app.command()
def init(path: Annotated[Path, typer.Argument(help="Directory of the new lab.")]) -> None:
    """Create a lab: labrat.toml (validated settings), program.md (the agent's instructions), the ledger."""
    from harness.lab import init_lab

    config_file = init_lab(path)
    out.print(f"lab ready: {config_file} (edit it and {path / 'program.md'}, then `labrat run`)")


@app.command()
def demo(
    runtime: Annotated[str, typer.Option(help="runc, or runsc for gVisor.")] = "runc",
) -> None:
    """A smoke session of the sandbox: exec, edit, snapshot, restore, all in a hardened container."""
    from sandbox.engine import reap_orphans
    from sandbox.images import build_image
    from sandbox.policy import SandboxPolicy
    from sandbox.sandbox import Sandbox
    from sandbox.snapshots import SnapshotStore

    reap_orphans()
    with _status("preparing the sandbox image") as update:
        image = build_image(progress=update)
    policy = SandboxPolicy(image=image, runtime=runtime)
    store = SnapshotStore()
    session = f"demo{int(time.time())}"
    table = Table(title=f"labrat sandbox demo ({runtime})")
    for column in ("step", "result", "seconds"):
        table.add_column(column)

    def step(name: str, fn):
        started = time.monotonic()
        result = fn()
        shown = f"{result.name} (depth {result.depth}, {result.layer_bytes} bytes)" if hasattr(result, "layer_bytes") else str(result)
        table.add_row(name, shown, f"{time.monotonic() - started:.3f}")
        return result

    snaps = []
    try:
        with Sandbox.start(policy, session=session) as box:
            step("who am I", lambda: box.exec("id -un").stdout.strip())
            step("network", lambda: box.exec("getent hosts pypi.org >/dev/null && echo reachable || echo none").stdout.strip())
            step("torch in container", lambda: box.exec(
                "python -c 'import torch; a=torch.randn(256,256); print(torch.__version__, float((a@a).abs().mean()) > 0)'",
                timeout=120).stdout.strip())
            box.write_file("notes.txt", "experiment 1\n")
            snaps.append(step("snapshot #1", lambda: store.snapshot(box, labels={"experiment": "1"}, name=f"{session}-1")).name)
            box.write_file("notes.txt", "experiment 2\n")
            snaps.append(step("snapshot #2", lambda: store.snapshot(box, labels={"experiment": "2"}, name=f"{session}-2")).name)
        with store.restore(snaps[0], policy, session=session) as restored:
            step("restore #1, read notes.txt", lambda: restored.read_text("notes.txt").strip())
    finally:
        with contextlib.suppress(SandboxError):
            store.gc(keep=[], name_prefix=session)
    out.print(table)


def main() -> None:
    """Entry point: structured logs, SIGTERM handled like Ctrl-C, one-line errors."""
    logs.configure()
    interrupt_on_sigterm()
    try:
        app()
    except (SandboxError, ConfigError) as exc:
        console.print(f"[bold red]labrat: error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("labrat: interrupted; containers removed", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
