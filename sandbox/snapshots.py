"""SnapshotStore: per-experiment snapshots of a sandbox's filesystem as Docker images.

A snapshot is `docker commit` of the container's writable layer (only the diff is stored), tagged
`labrat-snapshot:<name>` and labelled with its lineage. Layers stack with each commit and overlay2
cannot mount more than ~125 of them, so when a snapshot would sit more than `max_depth` commits
above its base image it is *flattened* instead: the state directories (workspace and home, the
only places the agent's user can write) are copied into a fresh container of the base image and
committed there, one layer above the base. Every snapshot therefore restores at any lineage depth.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import re
import secrets
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import docker
import docker.errors
import requests.exceptions
import structlog
from pydantic import BaseModel

from sandbox.engine import engine_errors, owner_labels, remove_container, resolve_client
from sandbox.errors import FileMissing, FileTooLarge, PathRefused, SandboxError, SnapshotMissing
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox

log = structlog.get_logger(__name__)

REPOSITORY = "labrat-snapshot"
L_SNAPSHOT = "labrat.snapshot"
L_NAME = "labrat.snapshot.name"
L_PARENT = "labrat.snapshot.parent"
L_BASE = "labrat.snapshot.base"
L_DEPTH = "labrat.snapshot.depth"
L_LINEAGE_DEPTH = "labrat.snapshot.lineage_depth"
L_CREATED = "labrat.snapshot.created"
USER_PREFIX = "labrat.meta."  # caller labels (experiment id, parent experiment, trainer hash, config, seed)
DEFAULT_MAX_DEPTH = 48
# A flatten copies the state directories as root into a container of the base image, whose directories
# belong to the agent's user: root needs DAC_OVERRIDE to clear them. Only harness commands run there.
FLATTEN_CAPS = ("DAC_OVERRIDE",)
BUNDLE_FORMAT = "labrat-snapshot/2"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")


class Snapshot(BaseModel):
    image_id: str
    name: str
    parent_id: str | None  # the snapshot this one was taken on top of (None for the first)
    base_id: str  # the sandbox image every layer of this snapshot stands on
    depth: int  # committed layers above the base image (1..max_depth): what overlay2 must stack
    lineage_depth: int  # snapshots in the chain back to the base (unbounded; flattening does not reset it)
    created: str
    labels: dict[str, str]  # caller labels, prefix removed
    layer_bytes: int | None = None  # bytes of its own (top) layer; read for single snapshots, not by list()

    @property
    def ref(self) -> str:
        return f"{REPOSITORY}:{self.name}"

    @classmethod
    def from_image(cls, image, with_size: bool = False) -> Snapshot:
        labels = image.labels or {}
        if labels.get(L_SNAPSHOT) != "1":
            raise SnapshotMissing(f"image {image.short_id} is not a labrat snapshot")
        return cls(
            image_id=image.id,
            name=labels[L_NAME],
            parent_id=labels.get(L_PARENT) or None,
            base_id=labels[L_BASE],
            depth=int(labels[L_DEPTH]),
            lineage_depth=int(labels.get(L_LINEAGE_DEPTH, labels[L_DEPTH])),
            created=labels.get(L_CREATED, ""),
            labels={k[len(USER_PREFIX):]: v for k, v in labels.items() if k.startswith(USER_PREFIX)},
            layer_bytes=_top_layer_bytes(image) if with_size else None,
        )


class GcReport(BaseModel):
    removed: list[str]
    kept: list[str]
    bytes_freed: int
    dry_run: bool


class SnapshotStore:
    """Create, restore, query, export/import and garbage-collect snapshots on the engine."""

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH, *, client: docker.DockerClient | None = None):
        if not 1 <= max_depth <= 100:
            raise ValueError("max_depth must be between 1 and 100 (overlay2 mounts at most ~125 layers)")
        self.max_depth = max_depth
        self.client = resolve_client(client)

    # -- create / restore --------------------------------------------------------------------------

    def snapshot(self, sandbox: Sandbox, labels: dict[str, str] | None = None, name: str | None = None) -> Snapshot:
        """Commit the sandbox's filesystem. Flattens onto the base when the layer stack would get too deep."""
        name = name or f"s{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}-{secrets.token_hex(3)}"
        if not _NAME_RE.match(name):
            raise SandboxError(f"snapshot name {name!r} must match {_NAME_RE.pattern}")
        if self._find(name) is not None:
            raise SandboxError(f"snapshot {name} already exists")
        # Lineage parent: the last snapshot of this sandbox, else the snapshot it was restored from.
        # Layer depth counts from the image the container runs on: a commit adds one layer to *that*.
        origin = self._snapshot_image(sandbox.origin)
        parent = self._snapshot_image(sandbox.last_snapshot) if sandbox.last_snapshot else origin
        base_id = origin.base_id if origin else self._image_id(sandbox.origin)
        # The limit bounds what a snapshot holds above the base image: this container's writes plus the
        # layers of the snapshots it descends from (else a workspace could grow by the limit per keep).
        written = sandbox.disk_usage()
        stacked = written + (self._image_size(origin.image_id) - self._image_size(base_id) if origin else 0)
        if stacked > sandbox.policy.disk_bytes:
            # A workspace that ballooned must not be copied into the store (and into every later flatten).
            raise SandboxError(
                f"refusing to snapshot {sandbox.name}: it holds {stacked} bytes above the base image "
                f"({written} written since its last restore), over its disk limit of {sandbox.policy.disk_bytes}; "
                "delete files first"
            )
        depth = origin.depth + 1 if origin else 1
        meta = {
            L_SNAPSHOT: "1",
            L_NAME: name,
            L_PARENT: parent.image_id if parent else "",
            L_BASE: base_id,
            L_LINEAGE_DEPTH: str(parent.lineage_depth + 1 if parent else 1),
            L_CREATED: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
            **{USER_PREFIX + k: str(v) for k, v in (labels or {}).items()},
        }
        if depth > self.max_depth:
            image = self._flatten(sandbox, base_id, {**meta, L_DEPTH: "1"}, name)
        else:
            image = self._commit(sandbox.container, {**meta, L_DEPTH: str(depth)}, name)
        snap = Snapshot.from_image(image, with_size=True)
        sandbox.last_snapshot = snap.image_id
        log.info("snapshot.created", name=name, depth=snap.depth, lineage_depth=snap.lineage_depth)
        return snap

    def restore(self, snapshot: Snapshot | str, policy: SandboxPolicy | None = None, *, session: str = "adhoc",
                role: str = "work") -> Sandbox:
        """A new running sandbox whose filesystem is the snapshot's."""
        snap = self.get(snapshot) if isinstance(snapshot, str) else snapshot
        self._require_present(snap)
        policy = (policy or SandboxPolicy()).model_copy(update={"image": snap.image_id})
        return Sandbox.start(policy, session=session, role=role, client=self.client)

    def read_file(self, snapshot: Snapshot | str, path: str, max_bytes: int, *, session: str = "adhoc") -> bytes:
        """The bytes of one regular file of a snapshot, read from a container that is created and never started:
        nothing of the snapshot runs. A missing path, a link or another kind of file, or one over `max_bytes`
        raises FileMissing, PathRefused or FileTooLarge."""
        snap = self.get(snapshot) if isinstance(snapshot, str) else snapshot
        self._require_present(snap)
        api = self.client.api
        with engine_errors():
            container = api.create_container(snap.image_id, command=["true"], network_disabled=True,
                                             labels=owner_labels(session, "read"))["Id"]
        try:
            with engine_errors():
                try:
                    stream, stat = api.get_archive(container, path)
                except docker.errors.NotFound:
                    raise FileMissing(f"{path} does not exist in snapshot {snap.name}") from None
                # Go's FileMode: any type bit (directory, link, pipe, socket, device) is not a regular file.
                if stat.get("linkTarget") or int(stat.get("mode", 0)) & _GO_MODE_TYPE_BITS:
                    raise PathRefused(f"{path} in snapshot {snap.name} is not a regular file")
                if int(stat.get("size", 0)) > max_bytes:
                    raise FileTooLarge(f"{path} is {stat['size']} bytes, over the {max_bytes}-byte limit")
                archive = b"".join(_capped(stream, max_bytes + 64 * 1024))
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                member = tar.next()
                if member is None or not member.isfile():
                    raise PathRefused(f"{path} in snapshot {snap.name} is not a regular file")
                return tar.extractfile(member).read(max_bytes + 1)[:max_bytes]
        finally:
            remove_container(container, client=self.client)

    def _commit(self, container, labels: dict[str, str], name: str):
        # The image config keeps the base's Env/Cmd/WorkingDir; Labels are replaced, so the container's
        # owner labels (pid, host) never end up on a snapshot.
        with engine_errors():
            return container.commit(repository=REPOSITORY, tag=name, conf={"Labels": labels}, pause=True)

    def _flatten(self, sandbox: Sandbox, base_id: str, labels: dict[str, str], name: str):
        """Copy the sandbox's state directories into a fresh container of the base image and commit it there."""
        state_dirs = sandbox.policy.state_dirs
        # The sandbox's own limits, under runc (the daemon copies files in and out of it, not gVisor), with no
        # GPU, data mount or environment: nothing runs there but the harness's `rm`, and the commit keeps the
        # base image's Env.
        policy = sandbox.policy.model_copy(update={
            "image": base_id, "runtime": "runc", "gpus": None, "ro_mounts": {}, "env": {}, "read_only": False,
            "cap_add": FLATTEN_CAPS,
        })
        api = self.client.api
        with Sandbox.start(policy, session=sandbox.session, role="flatten", client=self.client) as flat:
            # Cleared while the container is still empty, so its disk check never counts the copies below.
            wipe = flat.exec(["/bin/rm", "-rf", "--one-file-system", *state_dirs], user="root", workdir="/")
            if not wipe.ok:
                raise SandboxError(f"flatten: could not clear {', '.join(state_dirs)} in the base container: "
                                   f"{(wipe.stderr.strip().splitlines() or ['no output'])[-1]}")
            for directory in state_dirs:
                # get_archive streams the directory as the daemon sees it: symlinks stay links, never followed.
                with engine_errors():
                    stream, _ = api.get_archive(sandbox.container.id, directory)
                    with tempfile.TemporaryFile() as archive:
                        for chunk in stream:
                            archive.write(chunk)
                        archive.seek(0)
                        if not api.put_archive(flat.container.id, str(Path(directory).parent), archive):
                            raise SandboxError(f"flatten: could not copy {directory} into the base container")
            return self._commit(flat.container, labels, name)

    # -- queries -----------------------------------------------------------------------------------

    def _find(self, name: str):
        with engine_errors():
            try:
                return self.client.images.get(f"{REPOSITORY}:{name}")
            except docker.errors.ImageNotFound:
                return None

    def get(self, ref: str) -> Snapshot:
        """A snapshot by name, `labrat-snapshot:name`, or image id."""
        name = ref.split(":", 1)[1] if ref.startswith(REPOSITORY + ":") else ref
        image = self._find(name) if _NAME_RE.match(name) else None
        if image is None:
            with engine_errors():
                try:
                    image = self.client.images.get(ref)
                except docker.errors.ImageNotFound:
                    image = None
        if image is None or (image.labels or {}).get(L_SNAPSHOT) != "1":
            raise SnapshotMissing(f"snapshot {ref} does not exist (garbage-collected, or never imported here)")
        return Snapshot.from_image(image, with_size=True)

    def list(self, **label_filters: str) -> list[Snapshot]:
        """All snapshots (optionally with caller labels equal to the given values), oldest first."""
        filters = [f"{L_SNAPSHOT}=1"] + [f"{USER_PREFIX}{k}={v}" for k, v in label_filters.items()]
        images = []
        with engine_errors():
            for row in self.client.api.images(name=REPOSITORY, filters={"label": filters}):
                with contextlib.suppress(docker.errors.ImageNotFound):  # removed since the listing (another gc)
                    images.append(self.client.images.get(row["Id"]))
        snaps = [Snapshot.from_image(image) for image in images]
        return sorted(snaps, key=lambda s: (s.created, s.name))

    def lineage(self, snapshot: Snapshot | str) -> list[Snapshot]:
        """The chain from the oldest snapshot still present to `snapshot` (inclusive)."""
        snap = self.get(snapshot) if isinstance(snapshot, str) else snapshot
        return _chain(snap, {s.image_id: s for s in self.list()})

    def children(self, snapshot: Snapshot | str) -> list[Snapshot]:
        snap = self.get(snapshot) if isinstance(snapshot, str) else snapshot
        return [s for s in self.list() if s.parent_id == snap.image_id]

    def layer_counts(self) -> list[tuple[Snapshot, int]]:
        """Every snapshot image on the engine (of any lab, tagged or not) with the number of layers overlay2
        must stack to mount it."""
        with engine_errors():
            images = self.client.images.list(filters={"label": f"{L_SNAPSHOT}=1"})
        return [(Snapshot.from_image(image), len(image.attrs["RootFS"]["Layers"])) for image in images]

    def _snapshot_image(self, ref: str) -> Snapshot | None:
        """The snapshot behind an image reference, or None for a plain (base) image."""
        with engine_errors(image=ref):
            image = self.client.images.get(ref)
        if (image.labels or {}).get(L_SNAPSHOT) == "1":
            return Snapshot.from_image(image)
        return None

    def _image_id(self, ref: str) -> str:
        with engine_errors(image=ref):
            return self.client.images.get(ref).id

    def _image_size(self, ref: str) -> int:
        """Bytes of the image with all the layers under it (the engine's `Size`)."""
        with engine_errors(image=ref):
            return int(self.client.api.inspect_image(ref).get("Size") or 0)

    def _require_present(self, snap: Snapshot) -> None:
        with engine_errors():
            try:
                self.client.images.get(snap.image_id)
            except docker.errors.ImageNotFound:
                raise SnapshotMissing(f"snapshot {snap.name} is gone (garbage-collected?)") from None

    # -- export / import ---------------------------------------------------------------------------

    def export(self, snapshots: Snapshot | str | list[Snapshot | str], path: str | Path,
               extra: dict | None = None) -> Path:
        """Write snapshots as one self-contained tar: `docker save` of their images (all layers, shared
        ones once) and a manifest with the images' SHA-256 and the caller's `extra` metadata (and its
        SHA-256). `import_` verifies both before loading anything."""
        items = snapshots if isinstance(snapshots, list) else [snapshots]
        snaps = [self.get(s) if isinstance(s, str) else s for s in items]
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        digest = hashlib.sha256()
        with engine_errors(), open(partial, "wb") as out:
            for chunk in _save_images(self.client, [f"{REPOSITORY}:{snap.name}" for snap in snaps]):
                digest.update(chunk)
                out.write(chunk)
        extra_json = json.dumps(extra or {}, sort_keys=True)
        manifest = {"format": BUNDLE_FORMAT, "snapshots": [snap.model_dump() for snap in snaps],
                    "image_sha256": digest.hexdigest(), "extra": json.loads(extra_json),
                    "extra_sha256": hashlib.sha256(extra_json.encode()).hexdigest()}
        with tarfile.open(path, "w") as bundle:
            bundle.add(partial, arcname="image.tar")
            data = json.dumps(manifest, indent=2).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            bundle.addfile(info, fileobj=io.BytesIO(data))
        partial.unlink()
        return path

    def import_(self, path: str | Path) -> tuple[list[Snapshot], dict]:
        """Load a bundle written by `export`: (its snapshots, its extra metadata). Refuses a bundle whose
        checksums do not match, and checks that every image loaded under the id the manifest names."""
        path = Path(path)
        try:
            bundle = tarfile.open(path, "r")
        except (OSError, tarfile.TarError) as exc:
            raise SandboxError(f"{path} is not a labrat snapshot bundle: {exc}") from None
        with bundle:
            try:
                manifest = json.loads(bundle.extractfile("manifest.json").read())
                image_member = bundle.getmember("image.tar")
            except (KeyError, AttributeError, ValueError) as exc:
                raise SandboxError(f"{path} is not a labrat snapshot bundle (no manifest/image): {exc}") from None
            if manifest.get("format") != BUNDLE_FORMAT:
                raise SandboxError(f"{path}: unknown bundle format {manifest.get('format')!r}")
            extra_json = json.dumps(manifest.get("extra", {}), sort_keys=True)
            if hashlib.sha256(extra_json.encode()).hexdigest() != manifest.get("extra_sha256"):
                raise SandboxError(f"{path}: metadata checksum mismatch, the bundle's manifest was altered")
            digest = hashlib.sha256()
            with tempfile.TemporaryFile() as image_tar:
                source = bundle.extractfile(image_member)
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    image_tar.write(chunk)
                if digest.hexdigest() != manifest["image_sha256"]:
                    raise SandboxError(f"{path}: image checksum mismatch, the bundle was altered or truncated")
                image_tar.seek(0)
                with engine_errors():
                    self.client.images.load(image_tar)
        snaps = [self.get(entry["name"]) for entry in manifest["snapshots"]]
        for snap, entry in zip(snaps, manifest["snapshots"]):
            if snap.image_id != entry["image_id"]:  # image ids are content digests: this is the image exported
                raise SandboxError(f"{path}: snapshot {snap.name} loaded as {snap.image_id[:19]}, the manifest says "
                                   f"{entry['image_id'][:19]}")
        return snaps, manifest.get("extra", {})

    # -- garbage collection ------------------------------------------------------------------------

    def gc(self, keep: Iterable[Snapshot | str], dry_run: bool = False, name_prefix: str = "",
           **label_filters: str) -> GcReport:
        """Remove snapshots not in `keep` and not an ancestor of one in `keep`.

        Only snapshots whose name starts with `name_prefix` and whose caller labels match
        `label_filters` are candidates, so a lab never touches another lab's snapshots on a shared engine.
        """
        every = self.list()
        by_id = {s.image_id: s for s in every}
        keep_ids: set[str] = set()
        for kept in keep:
            snap = self.get(kept) if isinstance(kept, str) else kept
            keep_ids.update(s.image_id for s in _chain(snap, by_id))
        candidates = self.list(**label_filters) if label_filters else every
        doomed = [s for s in candidates if s.image_id not in keep_ids and s.name.startswith(name_prefix)]
        for snap in doomed:
            with engine_errors(), contextlib.suppress(docker.errors.ImageNotFound):
                snap.layer_bytes = _top_layer_bytes(self.client.images.get(snap.image_id))
        if not dry_run:
            # Newest first: a child goes before its parent, so parents' layers are freed as soon as possible.
            for snap in sorted(doomed, key=lambda s: s.lineage_depth, reverse=True):
                with engine_errors(), contextlib.suppress(docker.errors.ImageNotFound):
                    self.client.images.remove(snap.ref, noprune=False)
        # Each snapshot owns exactly its top layer; everything below is shared with its parent or the base.
        freed = sum(s.layer_bytes or 0 for s in doomed)
        report = GcReport(
            removed=[s.name for s in doomed], kept=sorted(s.name for s in every if s.image_id in keep_ids),
            bytes_freed=freed, dry_run=dry_run,
        )
        log.info("snapshot.gc", removed=len(report.removed), bytes_freed=freed, dry_run=dry_run)
        return report


def _save_images(client: docker.DockerClient, names: list[str]) -> Iterator[bytes]:
    """`docker save` of several images in one tar (layers they share are stored once). docker-py saves one
    image per call (its multi-image save was never merged: docker/docker-py#2490), so this asks the engine's
    /images/get for all of them through the client's public requests session, as docker-py would."""
    api = client.api
    response = api.get(f"{api.base_url}/v{api.api_version}/images/get", params={"names": names}, stream=True,
                       timeout=api.timeout)
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as exc:
        raise docker.errors.create_api_error_from_http_exception(exc) from exc
    return response.iter_content(2 * 1024 * 1024)


def _chain(snap: Snapshot, by_id: dict[str, Snapshot]) -> list[Snapshot]:
    """snap and its ancestors still present, oldest first."""
    chain = [snap]
    while chain[-1].parent_id and chain[-1].parent_id in by_id:
        chain.append(by_id[chain[-1].parent_id])
    return chain[::-1]


def _top_layer_bytes(image) -> int:
    return int(image.history()[0].get("Size") or 0)


# Go's os.ModeType (directory, symlink, device, named pipe, socket, char device, irregular), as the engine's
# stat of an archive path reports the mode.
_GO_MODE_TYPE_BITS = 1 << 31 | 1 << 27 | 1 << 26 | 1 << 25 | 1 << 24 | 1 << 21 | 1 << 19


def _capped(stream: Iterable[bytes], limit: int) -> Iterator[bytes]:
    """The stream's chunks up to `limit` bytes in all; more is refused, never buffered."""
    seen = 0
    for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise FileTooLarge(f"the archive grew past {limit} bytes")
        yield chunk
