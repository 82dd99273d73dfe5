"""The connection to the Docker engine, and translation of its failures into one-line errors.

Every docker-py call in this package goes through `engine_errors()` so the user never sees a
urllib3 traceback for a stopped daemon or a socket without permission. Functions and objects that
talk to the engine take their docker client as the `client` keyword (docker-py's style); without
one they use the process-wide `client()`.
"""

import contextlib
import functools
import os
import socket
import time

import docker
import docker.errors
import requests.exceptions
import structlog

from sandbox.errors import EngineUnavailable, ImageMissing, RuntimeUnavailable, SandboxError

log = structlog.get_logger(__name__)

LABEL_SESSION = "labrat.session"
LABEL_ROLE = "labrat.role"
LABEL_OWNER_PID = "labrat.owner_pid"
LABEL_OWNER_HOST = "labrat.owner_host"
LABEL_OWNER_START = "labrat.owner_start"
MIN_API_VERSION = "1.41"

RUNSC_HINT = (
    'register it in /etc/docker/daemon.json as {"runtimes": {"runsc": {"path": "/usr/bin/runsc", '
    '"runtimeArgs": ["--network=none", "--overlay2=none"]}}} and reload dockerd (or run scripts/setup-host.sh)'
)

# docker-py's base exception: what engine_errors() lets through untranslated (an engine failure with no
# one-line message of labrat's). Code outside this package catches it by this name, never docker's.
EngineError = docker.errors.DockerException


def _describe_connection_error(exc: BaseException) -> str:
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    text = str(exc)
    if "Permission denied" in text or isinstance(getattr(exc, "__context__", None), PermissionError):
        return (
            f"permission denied on the Docker socket ({host}): add your user to the 'docker' group "
            "(sudo usermod -aG docker $USER) and log in again"
        )
    return (
        f"the Docker engine is not reachable at {host}: start it (sudo systemctl start docker, "
        "or scripts/setup-host.sh) and retry"
    )


@contextlib.contextmanager
def engine_errors(image: str | None = None):
    """Turn docker-py / transport failures into SandboxError subclasses with actionable messages."""
    try:
        yield
    except SandboxError:
        raise
    except docker.errors.ImageNotFound as exc:
        name = image or str(exc)
        raise ImageMissing(f"image {name} is not on this engine: build it with `labrat image build`") from exc
    except docker.errors.DockerException as exc:
        text = str(exc)
        if "Error while fetching server API version" in text or "Connection aborted" in text:
            raise EngineUnavailable(_describe_connection_error(exc)) from exc
        if 'could not select device driver "" with capabilities: [[gpu]]' in text:
            raise RuntimeUnavailable(
                "GPUs requested but this engine has no NVIDIA runtime: install the NVIDIA Container Toolkit "
                "(nvidia-ctk runtime configure --runtime=docker) and restart dockerd, or run without --gpus"
            ) from exc
        if "unknown or invalid runtime name" in text or "Unknown runtime specified" in text:
            raise RuntimeUnavailable(f"the engine does not know this runtime: {RUNSC_HINT}") from exc
        raise
    except (requests.exceptions.ConnectionError, ConnectionError, socket.error) as exc:
        raise EngineUnavailable(_describe_connection_error(exc)) from exc


@functools.cache
def _client_for(base_url: str | None) -> docker.DockerClient:
    with engine_errors():
        client = docker.from_env(timeout=120) if base_url is None else docker.DockerClient(base_url=base_url)
        version = client.version()
    api = version.get("ApiVersion", "0")
    if tuple(int(x) for x in api.split(".")) < tuple(int(x) for x in MIN_API_VERSION.split(".")):
        raise EngineUnavailable(f"Docker API {api} is too old: labrat needs {MIN_API_VERSION} (Docker 20.10) or newer")
    log.debug("engine.connected", api=api, version=version.get("Version"))
    return client


def client() -> docker.DockerClient:
    """The process-wide docker client for DOCKER_HOST (or the default socket). Raises one-line errors."""
    return _client_for(os.environ.get("DOCKER_HOST"))


def reset_client() -> None:
    """Forget cached clients (after DOCKER_HOST changes). A restarted daemon needs no reset: a client
    opens its connections per request, so it reaches the new daemon on the same socket."""
    _client_for.cache_clear()


def resolve_client(given: docker.DockerClient | None) -> docker.DockerClient:
    """The client a caller passed, else the process-wide one."""
    return client() if given is None else given


def engine_version(*, client: docker.DockerClient | None = None) -> dict:
    """The engine's `docker version` (Version, ApiVersion, ...)."""
    with engine_errors():
        return resolve_client(client).version()


def engine_info(*, client: docker.DockerClient | None = None) -> dict:
    """The engine's `docker info` (Runtimes, DockerRootDir, SecurityOptions, ...)."""
    with engine_errors():
        return resolve_client(client).info()


def running_containers(*, client: docker.DockerClient | None = None) -> list[tuple[str, dict]]:
    """(name, `docker inspect`) of every running container on the engine, labrat's or not."""
    with engine_errors():
        return [(c.name, c.attrs) for c in resolve_client(client).containers.list(ignore_removed=True)]


def wait_for_engine(seconds: float, *, client: docker.DockerClient | None = None) -> None:
    """Return once the engine answers a ping (at once if it does now); EngineUnavailable after `seconds`.
    A restarted dockerd takes ~20 s to come back; a session waits for it rather than giving up."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with engine_errors():
                resolve_client(client).ping()  # resolved each time: a down engine fails the default's first connect
            return
        except EngineUnavailable:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)


def remove_container(container: str, *, client: docker.DockerClient | None = None) -> None:
    """Force-remove a container by id or name. Quiet when it is gone already (404) or another caller is
    removing it (409): either way it ends up removed, which is all the caller asked for."""
    with engine_errors():
        try:
            resolve_client(client).api.remove_container(container, force=True)
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):
                raise


def remove_stopped(session: str, *, client: docker.DockerClient | None = None) -> list[str]:
    """Remove the session's containers that are no longer running (killed with a restarted engine).
    Returns their names."""
    removed = []
    with engine_errors():
        engine = resolve_client(client)
        for row in engine.api.containers(all=True, filters={"label": f"{LABEL_SESSION}={session}"}):
            if row.get("State") in ("running", "removing"):
                continue
            remove_container(row["Id"], client=engine)
            removed.append(row["Names"][0].lstrip("/"))
    return removed


IN_FLIGHT_ROLES = ("train", "eval-")  # an experiment's containers (roles, or role prefixes): not the working one


def remove_session_containers(session: str, roles: tuple[str, ...], *,
                              client: docker.DockerClient | None = None) -> list[str]:
    """Force-remove the session's containers whose role is one of `roles` (or starts with one ending in "-"):
    stops the experiments in flight at once (an interrupt with lanes at work). Returns their names."""
    removed = []
    with engine_errors():
        engine = resolve_client(client)
        for row in engine.api.containers(all=True, filters={"label": f"{LABEL_SESSION}={session}"}):
            role = (row.get("Labels") or {}).get(LABEL_ROLE, "")
            if any(role == r or (r.endswith("-") and role.startswith(r)) for r in roles):
                remove_container(row["Id"], client=engine)
                removed.append(row["Names"][0].lstrip("/"))
    return removed


def require_runtime(name: str, *, client: docker.DockerClient | None = None) -> None:
    """Fail with a one-line hint when the engine has no runtime called `name`."""
    if name == "runc":
        return
    runtimes = engine_info(client=client).get("Runtimes", {})
    if name not in runtimes:
        hint = RUNSC_HINT if name == "runsc" else "register it in /etc/docker/daemon.json and reload dockerd"
        raise RuntimeUnavailable(f"runtime {name!r} is not registered with the Docker engine: {hint}")


def owner_labels(session: str, role: str) -> dict[str, str]:
    """Labels that let a later process find, and reap, the containers of a session that died."""
    return {
        LABEL_SESSION: session,
        LABEL_ROLE: role,
        LABEL_OWNER_PID: str(os.getpid()),
        LABEL_OWNER_HOST: socket.gethostname(),
        LABEL_OWNER_START: _process_start(os.getpid()),
    }


def _process_start(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), so a reused PID is not taken for its owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(labels: dict[str, str]) -> bool:
    pid = int(labels.get(LABEL_OWNER_PID, "0") or 0)
    if pid <= 0:
        return False
    start = _process_start(pid)
    return bool(start) and start == labels.get(LABEL_OWNER_START, start)


def reap_orphans(*, client: docker.DockerClient | None = None) -> list[str]:
    """Remove labrat containers whose owning process (on this host) is dead. Returns their names."""
    reaped = []
    with engine_errors():
        engine = resolve_client(client)
        containers = engine.containers.list(all=True, filters={"label": LABEL_OWNER_PID}, ignore_removed=True)
        for container in containers:
            labels = container.labels
            if labels.get(LABEL_OWNER_HOST) != socket.gethostname():
                continue  # another machine's engine client; not ours to judge
            if _owner_alive(labels):
                continue
            remove_container(container.id, client=engine)
            reaped.append(container.name)
    if reaped:
        log.info("sandbox.reaped_orphans", count=len(reaped), names=reaped)
    return reaped
