"""Building the sandbox images offline: a debootstrap'd base, a torch wheelhouse, then Dockerfile(.gpu).

No registry is needed: the base rootfs comes from Debian's package mirror via debootstrap and
`docker import`; torch comes from a local wheelhouse installed with --no-index in a build stage.
Everything slow is cached under `cache_dir()` and every step is skipped when its output exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker.errors
import structlog

from sandbox.engine import client, engine_errors
from sandbox.errors import BuildFailed

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "labrat-base:bookworm"
CPU_IMAGE = "labrat-sandbox:cpu"
GPU_IMAGE = "labrat-sandbox:gpu"
TORCH_VERSION = "2.13.0"  # pinned: an open range pulls a multi-GB CUDA build
NUMPY_SPEC = "numpy>=1.26,<3"
LABEL_CONTEXT_HASH = "labrat.context_hash"
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"

Progress = Callable[[str], None]


def cache_dir() -> Path:
    path = Path(os.environ.get("LABRAT_CACHE", Path.home() / ".cache" / "labrat"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_exists(name: str) -> bool:
    with engine_errors():
        try:
            client().images.get(name)
            return True
        except docker.errors.ImageNotFound:
            return False


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


def ensure_base_image(name: str = BASE_IMAGE, progress: Progress = log.info) -> str:
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
        progress(f"debootstrap {DEBIAN_SUITE} from {mirror} (about a minute)")
        with tempfile.TemporaryDirectory(prefix="labrat-rootfs-") as rootfs:
            cmd = [debootstrap, "--variant=minbase", f"--include={DEBOOTSTRAP_PACKAGES}", DEBIAN_SUITE, rootfs, mirror]
            _run_step(cmd, "debootstrap")
            partial = rootfs_tar.with_suffix(".partial")
            subprocess.run(["tar", "-C", rootfs, "-cf", str(partial), "."], check=True)
            partial.rename(rootfs_tar)
    progress(f"importing {rootfs_tar.name} as {name}")
    repository, _, tag = name.partition(":")
    with engine_errors():
        client().api.import_image_from_file(str(rootfs_tar), repository=repository, tag=tag or "latest")
    if not image_exists(name):
        raise BuildFailed(f"docker import of {rootfs_tar} did not produce {name}")
    return name


def ensure_wheelhouse(progress: Progress = log.info) -> Path:
    """Download torch (CPU, cp311, manylinux) and its dependencies once, for offline image builds."""
    wheelhouse = cache_dir() / f"wheelhouse-torch-{TORCH_VERSION}"
    marker = wheelhouse / ".complete"
    if marker.exists():
        return wheelhouse
    progress(f"downloading torch=={TORCH_VERSION} wheels for the image into {wheelhouse}")
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


def _context_files(dockerfile: Path, wheelhouse: Path) -> list[tuple[str, Path]]:
    """(name in the build context, path on disk), sorted, deterministic."""
    files = [("Dockerfile", dockerfile)]
    for path in sorted((REPO_ROOT / "trainer").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.append((f"trainer/{path.relative_to(REPO_ROOT / 'trainer').as_posix()}", path))
    for path in sorted(wheelhouse.glob("*.whl")):
        files.append((f"wheelhouse/{path.name}", path))
    return files


def _context_hash(files: list[tuple[str, Path]], build_args: dict[str, str], base_id: str) -> str:
    digest = hashlib.sha256(repr(sorted(build_args.items())).encode() + base_id.encode())
    for name, path in files:
        digest.update(name.encode())
        # Wheels are large and immutable by name: hash their names and sizes, hash source files' bytes.
        digest.update(str(path.stat().st_size).encode() if name.startswith("wheelhouse/") else path.read_bytes())
    return digest.hexdigest()[:16]


def build_image(gpu: bool = False, base: str | None = None, tag: str | None = None, progress: Progress = log.info) -> str:
    """Build the CPU (or GPU) sandbox image; a no-op when an image of the same context already exists."""
    tag = tag or (GPU_IMAGE if gpu else CPU_IMAGE)
    dockerfile = REPO_ROOT / ("Dockerfile.gpu" if gpu else "Dockerfile")
    if base is None and not gpu:
        base = ensure_base_image(progress=progress)
    build_args = {"BASE_IMAGE": base} if base else {}
    wheelhouse = ensure_wheelhouse(progress=progress)
    base_id = ""
    if base:
        with engine_errors(image=base):
            base_id = client().images.get(base).id
    files = _context_files(dockerfile, wheelhouse)
    context_hash = _context_hash(files, build_args, base_id)
    with engine_errors():
        existing = client().images.list(filters={"label": f"{LABEL_CONTEXT_HASH}={context_hash}"})
    if any(tag in image.tags for image in existing):
        progress(f"{tag} is up to date ({context_hash})")
        return tag
    progress(f"building {tag} from {dockerfile.name} on {base or 'its default base'}")
    with tempfile.TemporaryFile() as context:
        with tarfile.open(fileobj=context, mode="w") as tar:
            for name, path in files:
                tar.add(path, arcname=name)
        context.seek(0)
        with engine_errors():
            stream = client().api.build(
                fileobj=context, custom_context=True, tag=tag, buildargs=build_args, rm=True, forcerm=True,
                labels={LABEL_CONTEXT_HASH: context_hash}, decode=True,
            )
            last_lines: list[str] = []
            for chunk in stream:
                if "error" in chunk:
                    raise BuildFailed(f"building {tag} failed: {chunk['error'].strip()}")
                line = chunk.get("stream", "").strip()
                if line:
                    last_lines = (last_lines + [line])[-5:]
                    if line.startswith("Step "):
                        progress(line)
    if not image_exists(tag):
        raise BuildFailed(f"building {tag} produced no image: {' | '.join(last_lines)}")
    return tag
