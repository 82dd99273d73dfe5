"""labrat's sandbox images: a debootstrap'd Debian base, a torch wheelhouse, then Dockerfile(.gpu) with trainer/.

No registry is needed: the base rootfs comes from Debian's package mirror via debootstrap and
`docker import`; torch comes from a local wheelhouse installed with --no-index in a build stage.
Everything slow is cached under `cache_dir()` and every step is skipped when its output exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import structlog

from sandbox.errors import BuildFailed
from sandbox.images import ContextFile, OnStep, build_dockerfile, image_exists, import_rootfs
from sandbox.policy import DEFAULT_IMAGE

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "labrat-base:bookworm"
CPU_IMAGE = DEFAULT_IMAGE  # what a default SandboxPolicy runs
GPU_IMAGE = "labrat-sandbox:gpu"
TORCH_VERSION = "2.13.0"  # pinned: an open range pulls a multi-GB CUDA build
NUMPY_SPEC = "numpy>=1.26,<3"
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"


def cache_dir() -> Path:
    path = Path(os.environ.get("LABRAT_CACHE", Path.home() / ".cache" / "labrat"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def debian_mirror() -> str:
    """The host's own Debian mirror (apt sources), so debootstrap uses what apt already reaches."""
    if os.environ.get("LABRAT_DEBIAN_MIRROR"):
        return os.environ["LABRAT_DEBIAN_MIRROR"]
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    for path in candidates:
        if not path.exists():
            continue
        text = path.read_text()
        for match in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            uri = match.group(1)
            if "security" not in uri:
                return uri
    return "http://deb.debian.org/debian"


def ensure_base_image(name: str = BASE_IMAGE, on_step: OnStep = log.info) -> str:
    """Import the Debian base image from a cached rootfs tar, making the tar with debootstrap if needed."""
    if image_exists(name):
        return name
    rootfs_tar = cache_dir() / f"base-{DEBIAN_SUITE}.tar"
    if not rootfs_tar.exists():
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).exists():
            raise BuildFailed("debootstrap is not installed: apt-get install debootstrap (or run scripts/setup-host.sh)")
        if os.geteuid() != 0:
            raise BuildFailed("making the base image needs root (debootstrap): run `sudo labrat image build` once")
        mirror = debian_mirror()
        on_step(f"debootstrap {DEBIAN_SUITE} from {mirror} (about a minute)")
        with tempfile.TemporaryDirectory(prefix="labrat-rootfs-") as rootfs:
            cmd = [debootstrap, "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", DEBIAN_SUITE, rootfs, mirror]
            _run_step(cmd, "debootstrap")
            partial = rootfs_tar.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "-cf", str(partial), "."], check=True)
            partial.rename(rootfs_tar)
    on_step(f"importing {rootfs_tar.name} as {name}")
    return import_rootfs(rootfs_tar, name)


def ensure_wheelhouse(on_step: OnStep = log.info) -> Path:
    """Download torch (CPU, cp311, manylinux) and its dependencies once, for offline image builds."""
    wheelhouse = cache_dir() / f"wheelhouse-torch-{TORCH_VERSION}"
    marker = wheelhouse / ".complete"
    if marker.exists():
        return wheelhouse
    on_step(f"downloading torch=={TORCH_VERSION} wheels for the image into {wheelhouse}")
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", f"torch=={TORCH_VERSION}", NUMPY_SPEC,
        "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "-d", str(wheelhouse),
    ]
    _run_step(cmd, f"pip download torch=={TORCH_VERSION}")
    marker.touch()
    return wheelhouse


def _run_step(cmd: list[str], what: str) -> None:
    """Run one build step; on failure, a one-line BuildFailed with the step's last line of output."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise BuildFailed(f"{what} failed: {tail[0]}")


def _context(dockerfile: Path, wheelhouse: Path) -> list[ContextFile]:
    """The Dockerfile, trainer/ and the wheels, in a fixed order (the build's content hash depends on it)."""
    files = [ContextFile("Dockerfile", dockerfile)]
    trainer = REPO_ROOT / "trainer"
    for path in sorted(trainer.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append(ContextFile(f"trainer/{path.relative_to(trainer).as_posix()}", path))
    for path in sorted(wheelhouse.glob("*.whl")):
        files.append(ContextFile(f"wheelhouse/{path.name}", path, immutable=True))
    return files


def build_image(gpu: bool = False, base: str | None = None, tag: str | None = None, on_step: OnStep = log.info) -> str:
    """Build the CPU (or GPU) sandbox image; a no-op when an image of the same context already exists."""
    tag = tag or (GPU_IMAGE if gpu else CPU_IMAGE)
    dockerfile = REPO_ROOT / ("Dockerfile.gpu" if gpu else "Dockerfile")
    if base is None:
        base = ensure_base_image(on_step=on_step)
    wheelhouse = ensure_wheelhouse(on_step=on_step)
    return build_dockerfile(tag, _context(dockerfile, wheelhouse), base=base,
                            build_args={"BASE_IMAGE": base} if base else {}, on_step=on_step)
