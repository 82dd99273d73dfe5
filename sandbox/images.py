"""Building images offline: a rootfs tarball imported as a base, a Dockerfile built from a given context.

No registry is needed: the caller supplies the base's root filesystem and every file of the build
context. A build whose context hashes the same as the tagged image's is skipped (a rebuild costs minutes).
What goes into an image (packages, files) is the caller's recipe, not this module's.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import docker
import docker.errors
import structlog

from sandbox.engine import engine_errors, resolve_client
from sandbox.errors import BuildFailed

log = structlog.get_logger(__name__)

LABEL_CONTEXT_HASH = "labrat.context_hash"

OnStep = Callable[[str], None]  # one line per step of a long job


class ContextFile(NamedTuple):
    name: str  # its path in the build context ("Dockerfile" is the one built)
    path: Path  # the file on this machine
    immutable: bool = False  # large and never changed under its name (a wheel): hashed by size, not content


def image_exists(name: str, *, client: docker.DockerClient | None = None) -> bool:
    with engine_errors():
        try:
            resolve_client(client).images.get(name)
            return True
        except docker.errors.ImageNotFound:
            return False


def inspect_image(name: str, *, client: docker.DockerClient | None = None) -> dict | None:
    """The engine's `docker image inspect` of `name` (Id, Created, Config, RootFS, ...); None if absent."""
    with engine_errors():
        try:
            return resolve_client(client).api.inspect_image(name)
        except docker.errors.ImageNotFound:
            return None


def import_rootfs(rootfs_tar: Path, name: str, *, client: docker.DockerClient | None = None) -> str:
    """`docker import` a root filesystem tarball as the image `name` (repository[:tag])."""
    client = resolve_client(client)
    repository, _, tag = name.partition(":")
    with engine_errors():
        client.api.import_image_from_file(str(rootfs_tar), repository=repository, tag=tag or "latest")
    if not image_exists(name, client=client):
        raise BuildFailed(f"docker import of {rootfs_tar} did not produce {name}")
    return name


def _context_hash(context: Sequence[ContextFile], build_args: Mapping[str, str], base_id: str) -> str:
    """What identifies a build: its arguments, the id of the image it starts from, every file's name and bytes."""
    digest = hashlib.sha256(repr(sorted(build_args.items())).encode() + base_id.encode())
    for file in context:
        digest.update(file.name.encode())
        digest.update(str(file.path.stat().st_size).encode() if file.immutable else file.path.read_bytes())
    return digest.hexdigest()[:16]


def build_dockerfile(tag: str, context: Sequence[ContextFile], *, base: str | None = None,
                     build_args: Mapping[str, str] | None = None, on_step: OnStep = log.info,
                     client: docker.DockerClient | None = None) -> str:
    """Build the context's Dockerfile as `tag`; a no-op when `tag` was built from the same context, arguments
    and `base` (the image the Dockerfile starts from, whose id is part of the hash)."""
    client = resolve_client(client)
    build_args = dict(build_args or {})
    dockerfile = next((file.path for file in context if file.name == "Dockerfile"), None)
    if dockerfile is None:
        raise ValueError(f"the build context of {tag} has no Dockerfile")
    base_id = ""
    if base:
        with engine_errors(image=base):
            base_id = client.images.get(base).id
    digest = _context_hash(context, build_args, base_id)
    with engine_errors():
        existing = client.images.list(filters={"label": f"{LABEL_CONTEXT_HASH}={digest}"})
    if any(tag in image.tags for image in existing):
        on_step(f"{tag} is up to date ({digest})")
        return tag
    on_step(f"building {tag} from {dockerfile.name} on {base or 'its default base'}")
    with tempfile.TemporaryFile() as archive:
        with tarfile.open(fileobj=archive, mode="w") as tar:
            for file in context:
                tar.add(file.path, arcname=file.name)
        archive.seek(0)
        with engine_errors():
            stream = client.api.build(
                fileobj=archive, custom_context=True, tag=tag, buildargs=build_args, rm=True, forcerm=True,
                labels={LABEL_CONTEXT_HASH: digest}, decode=True,
            )
            last_lines: list[str] = []
            for chunk in stream:
                if "error" in chunk:
                    raise BuildFailed(f"building {tag} failed: {chunk['error'].strip()}")
                line = chunk.get("stream", "").strip()
                if line:
                    last_lines = (last_lines + [line])[-5:]
                    if line.startswith("Step "):
                        on_step(line)
    if not image_exists(tag, client=client):
        raise BuildFailed(f"building {tag} produced no image: {' | '.join(last_lines)}")
    log.debug("image.built", tag=tag, context_hash=digest)
    return tag
