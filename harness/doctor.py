"""`labrat doctor`: can this machine run labs, and run them safely? Each check returns one-line findings.

The checks use the real engine: they start a gVisor container, probe a GPU device request and run
the hardened self-test in a default-policy sandbox, so a pass means the thing works, not that it
is configured. Checks that need the engine are skipped (one line says so) when it is unreachable.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from enum import StrEnum
from pathlib import Path

import docker.errors
import requests.exceptions
import structlog
from docker.types import DeviceRequest
from pydantic import BaseModel, ConfigDict

from harness.config import CONFIG_FILE, ConfigError, LabConfig, load_config
from sandbox.engine import _RUNSC_HINT, MIN_API_VERSION, client, engine_errors, owner_labels
from sandbox.errors import RuntimeUnavailable, SandboxError
from sandbox.images import CPU_IMAGE, GPU_IMAGE, image_exists
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from sandbox.snapshots import DEFAULT_MAX_DEPTH, L_SNAPSHOT, USER_PREFIX, Snapshot

log = structlog.get_logger(__name__)

GiB = 1024**3
DISK_WARN_BYTES = 10 * GiB  # a few sessions' snapshots and a rebuilt image fit above this
DISK_ERROR_BYTES = 1 * GiB  # below this a snapshot or an image build fails part-way
OVERLAY_MAX_LAYERS = 125  # Docker's layer store refuses a layer deeper than this (maxLayerDepth)
LAYER_WARN_LAYERS = 100  # well past the store's flattening (base + DEFAULT_MAX_DEPTH), close to the limit
DAEMON_JSON = Path("/etc/docker/daemon.json")
DEFAULT_SOCKET = "/var/run/docker.sock"
PROBE_TIMEOUT = 60  # seconds a probe container may take to start and exit (gVisor on a loaded machine)
SESSION = f"doctor{os.getpid()}"


class Level(StrEnum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    level: Level
    check: str
    message: str


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"


def _local_socket() -> str | None:
    """The engine's socket path when the engine is on this machine, else None."""
    host = _docker_host()
    return host.removeprefix("unix://") if host.startswith("unix://") else None


# -- the lab -----------------------------------------------------------------------------------------


def check_lab(lab: Path) -> tuple[list[Finding], LabConfig | None]:
    """The lab's settings: they decide whether a missing runsc or GPU is an error for it."""
    if not (lab / CONFIG_FILE).exists():
        return [Finding(level=Level.INFO, check="lab", message=f"{lab} has no {CONFIG_FILE} (not a lab yet): "
                        "checked against the defaults")], None
    try:
        config = load_config(lab)
    except ConfigError as exc:
        return [Finding(level=Level.ERROR, check="lab", message=str(exc))], None
    # labrat.toml has no key that loosens the sandbox (no_new_privileges, cap_drop, network are
    # SandboxPolicy fields only; LabConfig forbids unknown keys), so there is nothing insecure to find here.
    devices = f"GPUs {config.gpus}" if config.gpus else "CPU"
    return [Finding(level=Level.OK, check="lab", message=f"{lab} (runtime {config.runtime}, {devices})")], config


# -- engine ------------------------------------------------------------------------------------------


def check_engine() -> list[Finding]:
    """Reachable, and new enough: the same one-line errors every other command gives."""
    try:
        with engine_errors():
            version = client().version()
    except SandboxError as exc:
        return [Finding(level=Level.ERROR, check="engine", message=str(exc))]
    except docker.errors.DockerException as exc:  # docker-py refused the address itself: a malformed DOCKER_HOST
        return [Finding(level=Level.ERROR, check="engine", message=f"cannot use DOCKER_HOST={_docker_host()}: "
                        f"{str(exc).splitlines()[0]}")]
    return [Finding(level=Level.OK, check="engine", message=(
        f"Docker {version.get('Version', '?')} reachable at {_docker_host()} "
        f"(API {version.get('ApiVersion', '?')}, labrat needs {MIN_API_VERSION}+)"))]


def _probe(image: str, role: str, *, runtime: str = "runc", device_requests=None) -> tuple[int | None, str]:
    """Start a `true` container and wait for it: (exit code, its output or the engine's error).
    Raises RuntimeUnavailable when the engine lacks the runtime or the GPU driver."""
    name = f"labrat-{SESSION}-{role}-{secrets.token_hex(3)}"
    with engine_errors(image=image):
        container = client().containers.create(
            image, ["true"], name=name, runtime=runtime, network_mode="none", cap_drop=["ALL"],
            security_opt=["no-new-privileges:true"], device_requests=device_requests,
            labels=owner_labels(SESSION, role),
        )
    try:
        with engine_errors(image=image):
            container.start()
            status = container.wait(timeout=PROBE_TIMEOUT)
            output = container.logs().decode(errors="replace").strip()
        return status.get("StatusCode"), output or (status.get("Error") or {}).get("Message", "")
    except docker.errors.APIError as exc:
        return None, exc.explanation or str(exc)
    except requests.exceptions.Timeout:
        return None, f"did not exit within {PROBE_TIMEOUT} s"
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)


def check_runsc(info: dict, image_present: bool, config: LabConfig | None) -> list[Finding]:
    """gVisor registered, and able to start a container of the sandbox image."""
    needed = config is not None and config.runtime == "runsc"
    problem_level = Level.ERROR if needed else Level.WARN
    runsc = info.get("Runtimes", {}).get("runsc")
    if runsc is None:
        return [Finding(level=problem_level, check="runsc",
                        message=f"gVisor (runsc) is not registered with the engine: {_RUNSC_HINT}")]
    where = " ".join([runsc.get("path", "runsc"), *runsc.get("runtimeArgs", [])])
    if not image_present:
        return [Finding(level=Level.INFO, check="runsc", message=f"registered ({where}); not test-started: "
                        f"{CPU_IMAGE} is missing")]
    code, output = _probe(CPU_IMAGE, "runsc", runtime="runsc")
    if code != 0:
        last = output.splitlines()[-1] if output else "no output"
        return [Finding(level=problem_level, check="runsc", message=f"registered ({where}) but a `true` container "
                        f"under it failed (exit {code}): {last}")]
    return [Finding(level=Level.OK, check="runsc", message=f"registered ({where}); a container of {CPU_IMAGE} "
                    "started and exited 0 under it")]


def check_gpu(info: dict, image_present: bool, config: LabConfig | None) -> list[Finding]:
    """Whether `--gpus` can work: the probe makes the exact device request a GPU sandbox makes."""
    runtimes = info.get("Runtimes", {})
    registered = "nvidia runtime registered" if "nvidia" in runtimes else "no nvidia runtime registered"
    cdi = f"; CDI spec dirs {', '.join(info['CDISpecDirs'])}" if info.get("CDISpecDirs") else ""
    if not image_present:
        return [Finding(level=Level.INFO, check="gpu", message=f"{registered}{cdi}; GPU device request not probed: "
                        f"{CPU_IMAGE} is missing")]
    try:
        code, output = _probe(CPU_IMAGE, "gpuprobe", device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])])
        reason = None if code == 0 else (output.splitlines()[-1] if output else f"exit {code}")
    except RuntimeUnavailable:
        reason = "no NVIDIA runtime"
    if reason is None:
        return [Finding(level=Level.OK, check="gpu", message=f"a container with --gpus all started ({registered}{cdi})")]
    host_has_gpu = Path("/dev/nvidiactl").exists()
    level = Level.ERROR if config is not None and config.gpus else Level.WARN if host_has_gpu else Level.INFO
    fix = ("install the NVIDIA Container Toolkit (nvidia-ctk runtime configure --runtime=docker) and restart dockerd"
           if host_has_gpu or level is Level.ERROR else "CPU labs only")
    why = f" (this lab sets gpus = {config.gpus!r})" if level is Level.ERROR else ""
    return [Finding(level=level, check="gpu", message=f"{reason}: GPU runs unavailable{why} ({registered}{cdi}; {fix})")]


# -- disk --------------------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    """The path, or its nearest existing ancestor (a lab `labrat run` has not created yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk_finding(path: Path, what: str, remedy: str, warn_bytes: int, error_bytes: int) -> Finding:
    free = shutil.disk_usage(path).free
    level = Level.ERROR if free < error_bytes else Level.WARN if free < warn_bytes else Level.OK
    message = f"{_gib(free)} free at {path} ({what})"
    if level is not Level.OK:
        message += f": below {_gib(error_bytes if level is Level.ERROR else warn_bytes)}; {remedy}"
    return Finding(level=level, check="disk", message=message)


def check_lab_disk(lab: Path | None, warn_bytes: int = DISK_WARN_BYTES,
                   error_bytes: int = DISK_ERROR_BYTES) -> list[Finding]:
    """The lab's filesystem; without --lab the current directory, `labrat run`'s default lab."""
    what = "the lab" if lab is not None else "the current directory, the default lab"
    return [_disk_finding(_existing(lab or Path.cwd()), f"{what}: ledger, logs, exported bundles",
                          "free space or move the lab", warn_bytes, error_bytes)]


def check_docker_disk(info: dict, warn_bytes: int = DISK_WARN_BYTES,
                      error_bytes: int = DISK_ERROR_BYTES) -> list[Finding]:
    root = info.get("DockerRootDir", "")
    if _local_socket() is None or not root or not Path(root).exists():
        return [Finding(level=Level.INFO, check="disk", message=f"Docker root dir {root or '?'} is not on this "
                        "machine: its free space was not checked")]
    return [_disk_finding(Path(root), "Docker root dir: images, snapshots, containers' writable layers",
                          "`labrat gc` removes discarded snapshots, `docker image prune` dangling images",
                          warn_bytes, error_bytes)]


# -- snapshot layer depth ----------------------------------------------------------------------------


NO_LAB = "(no lab)"  # snapshots taken outside a lab (tests, `labrat smoke`, the library)


def check_layers(warn_layers: int = LAYER_WARN_LAYERS) -> list[Finding]:
    """Layers per snapshot image, the deepest per lab (a lab is one tree of lineages), against overlay2's limit."""
    with engine_errors():
        images = client().images.list(filters={"label": f"{L_SNAPSHOT}=1"})
        if not images:
            return [Finding(level=Level.OK, check="layers", message="no snapshots in the store")]
        deepest: dict[str, tuple[int, Snapshot]] = {}
        for image in images:
            try:
                layers = len(client().api.inspect_image(image.id)["RootFS"]["Layers"])
            except docker.errors.ImageNotFound:
                continue  # removed by a gc since the listing
            snap = Snapshot.from_image(image)
            lab = (image.labels or {}).get(f"{USER_PREFIX}lab", NO_LAB)
            if lab not in deepest or layers > deepest[lab][0]:
                deepest[lab] = (layers, snap)
    if not deepest:
        return [Finding(level=Level.OK, check="layers", message="no snapshots in the store")]
    layers, snap = max(deepest.values(), key=lambda item: item[0])
    labs = len(deepest.keys() - {NO_LAB})
    findings = [Finding(level=Level.OK, check="layers", message=(
        f"{len(images)} snapshots of {labs} labs{' and outside any lab' if NO_LAB in deepest else ''}; "
        f"deepest {snap.name}: {layers} layers ({snap.depth} commits on its base, lineage depth "
        f"{snap.lineage_depth}); the store flattens past {DEFAULT_MAX_DEPTH} commits, overlay2 stops at "
        f"{OVERLAY_MAX_LAYERS} layers"))]
    for lab, (layers, snap) in sorted(deepest.items()):
        if layers >= warn_layers:
            where = f"lab {lab}" if lab != NO_LAB else "outside any lab"
            findings.append(Finding(level=Level.WARN, check="layers", message=(
                f"{where}: snapshot {snap.name} has {layers} layers, {OVERLAY_MAX_LAYERS - layers} short of "
                f"overlay2's limit: its next commit may fail; flatten sooner (SnapshotStore max_depth) or "
                "continue from a shallower snapshot (`labrat rollback`)")))
    return findings


# -- insecure setups ---------------------------------------------------------------------------------


def _tcp_without_tls(hosts: list[str], tls_verify: bool, source: str) -> list[Finding]:
    if tls_verify:
        return []
    return [Finding(level=Level.WARN, check="security", message=(
        f"the engine listens on {host} without TLS client verification ({source}): anyone who reaches that "
        "port is root on this machine; remove the tcp host or set tlsverify with client certificates"))
        for host in hosts if host.startswith("tcp://")]


def check_daemon_config(path: Path = DAEMON_JSON) -> list[Finding]:
    """daemon.json settings that open the engine or switch off container confinement."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        return [Finding(level=Level.WARN, check="security", message=f"cannot read {path}: {exc}")]
    findings = _tcp_without_tls(list(config.get("hosts", [])), bool(config.get("tlsverify")), str(path))
    if str(config.get("seccomp-profile", "")).strip() == "unconfined":
        findings.append(Finding(level=Level.WARN, check="security", message=(
            f'{path} sets "seccomp-profile": "unconfined": containers get every syscall; remove the key '
            "(Docker's default profile) and reload dockerd")))
    return findings


def _dockerd_args() -> list[list[str]]:
    """The command lines of the dockerd processes on this machine (readable by any user)."""
    commands = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (proc / "comm").read_text().strip() == "dockerd":
                commands.append((proc / "cmdline").read_text().split("\0")[1:])
    return commands


def check_dockerd_flags() -> list[Finding]:
    """`dockerd -H tcp://...` without --tlsverify: the flags daemon.json does not show."""
    findings = []
    for args in _dockerd_args():
        hosts = []
        for i, arg in enumerate(args):
            if arg in ("-H", "--host") and i + 1 < len(args):
                hosts.append(args[i + 1])
            elif arg.startswith(("-H=", "--host=")):
                hosts.append(arg.split("=", 1)[1])
        tls_verify = any(arg in ("--tlsverify", "--tlsverify=true") for arg in args)
        findings += _tcp_without_tls(hosts, tls_verify, "dockerd command line")
    return findings


def check_client_env() -> list[Finding]:
    host = os.environ.get("DOCKER_HOST", "")
    if host.startswith("tcp://") and not os.environ.get("DOCKER_TLS_VERIFY"):
        return [Finding(level=Level.WARN, check="security", message=(
            f"DOCKER_HOST={host} without DOCKER_TLS_VERIFY: labrat talks to the engine unencrypted and "
            "unauthenticated; use TLS (DOCKER_TLS_VERIFY=1, DOCKER_CERT_PATH) or an ssh:// or unix:// host"))]
    return []


def check_socket_mode(path: str | None = None) -> list[Finding]:
    """A world-writable engine socket makes every local user root (or owner of a rootless engine)."""
    path = path or _local_socket()
    if path is None:
        return []
    try:
        info = os.stat(path)
    except OSError:
        return []  # no socket here: the engine check already said so
    if not info.st_mode & stat.S_IWOTH:
        return []
    who = "root on this machine" if info.st_uid == 0 else f"in control of uid {info.st_uid}'s engine"
    return [Finding(level=Level.WARN, check="security", message=(
        f"{path} is world-writable (mode {stat.S_IMODE(info.st_mode):04o}): every local user is {who}; "
        f"chmod 660 {path} and chgrp docker {path}"))]


def check_engine_security(info: dict) -> list[Finding]:
    options = info.get("SecurityOptions") or []
    seccomp = [opt for opt in options if "name=seccomp" in opt]
    if not seccomp:
        return [Finding(level=Level.WARN, check="security", message=(
            "the engine runs containers without seccomp (kernel or dockerd built without it): the sandbox's "
            "syscalls are unfiltered; use a seccomp-enabled kernel and Docker build"))]
    if any("profile=unconfined" in opt for opt in seccomp):
        return [Finding(level=Level.WARN, check="security", message=(
            "the engine's default seccomp profile is unconfined: containers get every syscall; remove "
            "seccomp-profile from daemon.json or dockerd's flags"))]
    return []


def _is_engine_socket(source: str) -> bool:
    socket_path = _local_socket()
    return source.endswith("/docker.sock") or (socket_path is not None and source == socket_path)


def check_containers() -> list[Finding]:
    """Running containers that hold the engine's socket or run privileged: each is root on this machine."""
    with engine_errors():
        containers = client().containers.list(ignore_removed=True)
    return [finding for container in containers for finding in container_risks(container.name, container.attrs)]


def container_risks(name: str, attrs: dict) -> list[Finding]:
    """What makes one container (its `docker inspect`) able to take over the host."""
    findings = []
    image = attrs.get("Config", {}).get("Image", "?")
    for mount in attrs.get("Mounts") or []:
        if _is_engine_socket(mount.get("Source", "")):
            findings.append(Finding(level=Level.WARN, check="security", message=(
                f"container {name} ({image}) has the Docker socket {mount['Source']} mounted at "
                f"{mount.get('Destination')}: whatever runs in it controls the engine, i.e. is root here; "
                f"stop it (docker rm -f {name}) unless you trust all of its code")))
    if attrs.get("HostConfig", {}).get("Privileged"):
        findings.append(Finding(level=Level.WARN, check="security", message=(
            f"container {name} ({image}) runs privileged: it can take over this machine; stop it "
            f"(docker rm -f {name}) unless you trust all of its code")))
    return findings


# -- the sandbox image and the hardened self-test ----------------------------------------------------

_SELF_TEST = ("echo uid=$(id -u); grep -E '^(CapEff|NoNewPrivs):' /proc/self/status | tr -d ' \\t' | tr : =; "
              "echo net=$(ls /sys/class/net | sort | tr '\\n' ' ')")


def check_hardening(policy: SandboxPolicy | None = None) -> list[Finding]:
    """Start a sandbox and look from inside, as the agent's user: what a user of labrat relies on."""
    policy = policy or SandboxPolicy()
    with Sandbox.start(policy, session=SESSION, role="selftest") as box:
        result = box.exec(_SELF_TEST, timeout=PROBE_TIMEOUT)
    if not result.ok:
        return [Finding(level=Level.ERROR, check="sandbox", message=(
            f"self-test exec failed (exit {result.exit_code}, {result.limit or 'no limit hit'}): "
            f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}"))]
    seen = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    interfaces = seen.get("net", "").split()
    problems = []
    if seen.get("uid") in (None, "0"):
        problems.append(f"runs as uid {seen.get('uid', '?')}")
    if int(seen.get("CapEff", "1"), 16) != 0:
        problems.append(f"has capabilities (CapEff {seen.get('CapEff', '?')})")
    if seen.get("NoNewPrivs") != "1":
        problems.append(f"may gain privileges (NoNewPrivs {seen.get('NoNewPrivs', '?')})")
    if interfaces != ["lo"]:
        problems.append(f"has network interfaces {interfaces}")
    if problems:
        return [Finding(level=Level.ERROR, check="sandbox", message=(
            f"a {policy.runtime} sandbox of {policy.image} is not hardened: it " + ", ".join(problems)))]
    return [Finding(level=Level.OK, check="sandbox", message=(
        f"hardened self-test passed in a default-policy sandbox ({policy.runtime}): uid {seen['uid']}, CapEff 0, "
        "NoNewPrivs 1, network interfaces: lo only"))]


def check_image(name: str) -> list[Finding]:
    with engine_errors():
        try:
            image = client().images.get(name)
        except docker.errors.ImageNotFound:
            return [Finding(level=Level.WARN, check="image", message=(
                f"{name} is not on this engine: `labrat image build{' --gpu' if name == GPU_IMAGE else ''}` "
                "builds it (`labrat run` does too, on first use)"))]
    return [Finding(level=Level.OK, check="image", message=(
        f"{name} present ({image.short_id.removeprefix('sha256:')}, built {image.attrs.get('Created', '?')[:19]})"))]


# -- all of them -------------------------------------------------------------------------------------


def _guarded(check: str, fn: Callable[[], list[Finding]]) -> list[Finding]:
    """One check's engine failure is one error line; the other checks still run."""
    try:
        return fn()
    except (SandboxError, docker.errors.DockerException) as exc:
        log.warning("doctor.check_failed", check=check, error=str(exc))
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [Finding(level=Level.ERROR, check=check, message=message)]


def run_checks(lab: Path | None = None) -> Iterator[Finding]:
    """Every check, findings in order as they come (the container checks take seconds)."""
    config = None
    if lab is not None:
        findings, config = check_lab(lab)
        yield from findings
    engine = check_engine()
    info: dict = {}
    if engine[0].level is Level.OK:
        try:
            with engine_errors():
                info = client().info()
        except SandboxError as exc:  # the engine went away between two calls
            engine.append(Finding(level=Level.ERROR, check="engine", message=str(exc)))
    yield from engine
    engine_up = bool(info)
    present = False
    if engine_up:
        with contextlib.suppress(SandboxError):  # check_image reports a failure to look
            present = image_exists(CPU_IMAGE)
        yield from _guarded("runsc", lambda: check_runsc(info, present, config))
        yield from _guarded("gpu", lambda: check_gpu(info, present, config))
    yield from check_lab_disk(lab)
    if engine_up:
        yield from check_docker_disk(info)
        yield from _guarded("layers", check_layers)
    security = check_daemon_config() + check_dockerd_flags() + check_client_env() + check_socket_mode()
    if engine_up:
        security += check_engine_security(info) + _guarded("security", check_containers)
    yield from security
    if engine_up and not security:
        local = ("no TCP endpoint without TLS, engine socket not world-writable" if _local_socket() else
                 "engine on another machine: its daemon.json, flags and socket not checked")
        yield Finding(level=Level.OK, check="security", message=(
            f"{local}; seccomp on; no running container privileged or holding the Docker socket"))
    if engine_up:
        images = [CPU_IMAGE] + ([GPU_IMAGE] if config is not None and config.gpus else [])
        for name in images:
            yield from _guarded("image", lambda name=name: check_image(name))
        if present:
            yield from _guarded("sandbox", check_hardening)
        else:
            yield Finding(level=Level.WARN, check="sandbox",
                          message=f"hardened self-test not run: {CPU_IMAGE} is missing")
    else:
        yield Finding(level=Level.INFO, check="skipped", message=(
            "runsc, gpu, Docker root dir disk, snapshot layers, seccomp, running containers, image and the sandbox "
            "self-test need the engine"))
