"""The engine's own security, as `labrat doctor` audits it: setups that make a local user, or whatever runs
in some container, root on this machine (an engine on TCP without TLS, a world-writable socket, seccomp
off, a container holding the socket or running privileged). Each check returns one-line findings.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from harness.findings import Finding, Level
from sandbox.engine import running_containers

DAEMON_JSON = Path("/etc/docker/daemon.json")
DEFAULT_SOCKET = "/var/run/docker.sock"


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"


def local_socket() -> str | None:
    """The engine's socket path when the engine is on this machine, else None."""
    host = docker_host()
    return host.removeprefix("unix://") if host.startswith("unix://") else None


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
    path = path or local_socket()
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
    socket_path = local_socket()
    return source.endswith("/docker.sock") or (socket_path is not None and source == socket_path)


def check_containers() -> list[Finding]:
    """Running containers that hold the engine's socket or run privileged: each is root on this machine."""
    return [finding for name, attrs in running_containers() for finding in container_risks(name, attrs)]


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
