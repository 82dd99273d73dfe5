"""`labrat doctor`: can this machine run labs, and run them safely? Each check returns one-line findings.
The NVIDIA stack (driver, toolkit, gVisor's nvproxy) is harness/gpu_stack.py's.

The checks use the real engine: they start a gVisor container, probe a GPU device request and run
the hardened self-test in a default-policy sandbox, so a pass means the thing works, not that it
is configured. Checks that need the engine are skipped (one line says so) when it is unreachable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from harness.config import CONFIG_FILE, ConfigError, LabConfig, load_config
from harness.engine_audit import (check_client_env, check_containers, check_daemon_config, check_dockerd_flags,
                                  check_engine_security, check_socket_mode, docker_host, local_socket)
from harness.findings import Finding, Level
from harness.gpu_stack import check_gpu_stack
from harness.image import CPU_IMAGE, GPU_IMAGE
from sandbox.engine import MIN_API_VERSION, RUNSC_HINT, EngineError, engine_info, engine_version
from sandbox.errors import RuntimeUnavailable, SandboxError
from sandbox.images import image_exists, inspect_image
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox, trial_run
from sandbox.snapshots import DEFAULT_MAX_DEPTH, Snapshot, SnapshotStore

log = structlog.get_logger(__name__)

GiB = 1024**3
DISK_WARN_BYTES = 10 * GiB  # a few sessions' snapshots and a rebuilt image fit above this
DISK_ERROR_BYTES = 1 * GiB  # below this a snapshot or an image build fails part-way
OVERLAY_MAX_LAYERS = 125  # Docker's layer store refuses a layer deeper than this (maxLayerDepth)
LAYER_WARN_LAYERS = 100  # well past the store's flattening (base + DEFAULT_MAX_DEPTH), close to the limit
PROBE_TIMEOUT = 60  # seconds a probe container may take to start and exit (gVisor on a loaded machine)
SESSION = f"doctor{os.getpid()}"


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


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
        version = engine_version()
    except SandboxError as exc:
        return [Finding(level=Level.ERROR, check="engine", message=str(exc))]
    except EngineError as exc:  # docker-py refused the address itself: a malformed DOCKER_HOST
        return [Finding(level=Level.ERROR, check="engine", message=f"cannot use DOCKER_HOST={docker_host()}: "
                        f"{str(exc).splitlines()[0]}")]
    return [Finding(level=Level.OK, check="engine", message=(
        f"Docker {version.get('Version', '?')} reachable at {docker_host()} "
        f"(API {version.get('ApiVersion', '?')}, labrat needs {MIN_API_VERSION}+)"))]


def _probe(policy: SandboxPolicy, role: str) -> tuple[int | None, str]:
    """Run `true` in a sandbox of the policy: (exit code, its output or the engine's error).
    Raises RuntimeUnavailable when the engine lacks the runtime or the GPU driver."""
    return trial_run(policy, ["true"], session=SESSION, role=role, timeout=PROBE_TIMEOUT)


def check_runsc(info: dict, image_present: bool, config: LabConfig | None) -> list[Finding]:
    """gVisor registered, and able to start a container of the sandbox image."""
    needed = config is not None and config.runtime == "runsc"
    problem_level = Level.ERROR if needed else Level.WARN
    runsc = info.get("Runtimes", {}).get("runsc")
    if runsc is None:
        return [Finding(level=problem_level, check="runsc",
                        message=f"gVisor (runsc) is not registered with the engine: {RUNSC_HINT}")]
    where = " ".join([runsc.get("path", "runsc"), *runsc.get("runtimeArgs", [])])
    if not image_present:
        return [Finding(level=Level.INFO, check="runsc", message=f"registered ({where}); not test-started: "
                        f"{CPU_IMAGE} is missing")]
    code, output = _probe(SandboxPolicy(image=CPU_IMAGE, runtime="runsc"), "runsc")
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
        code, output = _probe(SandboxPolicy(image=CPU_IMAGE, gpus="all"), "gpuprobe")
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
    if local_socket() is None or not root or not Path(root).exists():
        return [Finding(level=Level.INFO, check="disk", message=f"Docker root dir {root or '?'} is not on this "
                        "machine: its free space was not checked")]
    return [_disk_finding(Path(root), "Docker root dir: images, snapshots, containers' writable layers",
                          "`labrat gc` removes discarded snapshots, `docker image prune` dangling images",
                          warn_bytes, error_bytes)]


# -- snapshot layer depth ----------------------------------------------------------------------------


NO_LAB = "(no lab)"  # snapshots taken outside a lab (tests, `labrat smoke`, the library)


def check_layers(warn_layers: int = LAYER_WARN_LAYERS) -> list[Finding]:
    """Layers per snapshot image, the deepest per lab (a lab is one tree of lineages), against overlay2's limit."""
    counted = SnapshotStore().layer_counts()
    deepest: dict[str, tuple[int, Snapshot]] = {}
    for snap, layers in counted:
        lab = snap.labels.get("lab", NO_LAB)
        if lab not in deepest or layers > deepest[lab][0]:
            deepest[lab] = (layers, snap)
    if not deepest:
        return [Finding(level=Level.OK, check="layers", message="no snapshots in the store")]
    layers, snap = max(deepest.values(), key=lambda item: item[0])
    labs = len(deepest.keys() - {NO_LAB})
    findings = [Finding(level=Level.OK, check="layers", message=(
        f"{len(counted)} snapshots of {labs} labs{' and outside any lab' if NO_LAB in deepest else ''}; "
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
    attrs = inspect_image(name)
    if attrs is None:
        return [Finding(level=Level.WARN, check="image", message=(
            f"{name} is not on this engine: `labrat image build{' --gpu' if name == GPU_IMAGE else ''}` "
            "builds it (`labrat run` does too, on first use)"))]
    short_id = attrs["Id"].removeprefix("sha256:")[:12]
    return [Finding(level=Level.OK, check="image", message=(
        f"{name} present ({short_id}, built {attrs.get('Created', '?')[:19]})"))]


# -- all of them -------------------------------------------------------------------------------------


def _guarded(check: str, fn: Callable[[], list[Finding]]) -> list[Finding]:
    """One check's engine failure is one error line; the other checks still run."""
    try:
        return fn()
    except (SandboxError, EngineError) as exc:
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
            info = engine_info()
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
        yield from check_gpu_stack(info, config)
    yield from check_lab_disk(lab)
    if engine_up:
        yield from check_docker_disk(info)
        yield from _guarded("layers", check_layers)
    security = check_daemon_config() + check_dockerd_flags() + check_client_env() + check_socket_mode()
    if engine_up:
        security += check_engine_security(info) + _guarded("security", check_containers)
    yield from security
    if engine_up and not security:
        local = ("no TCP endpoint without TLS, engine socket not world-writable" if local_socket() else
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
