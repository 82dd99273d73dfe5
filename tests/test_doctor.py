"""`labrat doctor` against the real engine: real containers, real files, a real tmpfs; no mocks."""

import os
import re
import secrets
import shutil
import socket
import subprocess
import warnings
from dataclasses import replace
from pathlib import Path

import docker.errors
import pytest

from harness.config import LabConfig
from harness.doctor import check_gpu, check_hardening, check_lab_disk, check_layers
from harness.engine_audit import check_containers, check_daemon_config, check_socket_mode, container_risks
from harness.findings import Level
from harness.gpu_stack import (GpuStack, check_gpu_stack, parse_gpus, parse_nvproxy_drivers, parse_toolkit_version,
                               read_stack, stack_findings)
from sandbox.engine import client, owner_labels
from sandbox.policy import SandboxPolicy
from tests.conftest import LABRAT, SESSION, _runsc_skip_reason

LINE = re.compile(r"^(ok|info|warn|error) +[a-z]+: \S")


def doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([LABRAT, "doctor", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(LINE.match(line) for line in lines), done.stdout  # one line per finding, nothing else
    return done


def test_healthy_machine_exits_0_with_ok_lines(image):
    done = doctor()
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout
    assert not [line for line in lines if line.startswith("error")]
    assert any(re.match(r"ok    engine: Docker \S+ reachable at \S+ \(API 1\.\d+", line) for line in lines)
    if reason := _runsc_skip_reason():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have gVisor: {reason}")
        assert any(line.startswith("warn  runsc: gVisor (runsc) is not registered") for line in lines)
    else:
        assert any(line.startswith("ok    runsc: registered") and "exited 0" in line for line in lines)
    assert f"ok    image: {image} present" in done.stdout
    assert any(line.startswith("ok    sandbox: hardened self-test passed") for line in lines)
    assert any(line.startswith("ok    disk:") and "Docker root dir" in line for line in lines)
    assert any(line.startswith("ok    layers:") for line in lines)
    gpu = [line for line in lines if " gpu: " in line]
    assert len(gpu) == 1
    if not Path("/dev/nvidiactl").exists():  # no NVIDIA device on this host: the probe must say so, as info
        assert gpu[0].startswith("info  gpu: no NVIDIA runtime: GPU runs unavailable"), gpu[0]


def test_unreachable_tcp_engine_is_one_error_line_and_exit_1():
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_TLS_VERIFY"}
    done = subprocess.run([LABRAT, "doctor"], capture_output=True, text=True, timeout=120,
                          env={**env, "DOCKER_HOST": "tcp://127.0.0.1:1"})
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stdout.splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert errors == ["error engine: the Docker engine is not reachable at tcp://127.0.0.1:1: start it "
                      "(sudo systemctl start docker, or scripts/setup-host.sh) and retry"]
    assert any(line.startswith("warn  security: DOCKER_HOST=tcp://127.0.0.1:1 without DOCKER_TLS_VERIFY")
               for line in lines)
    assert any(line.startswith("info  skipped:") for line in lines)


def test_containers_holding_the_socket_or_privileged_are_named(image):
    created = []

    def create(role: str, **kwargs):
        container = client().containers.create(
            image, ["sleep", "60"], name=f"labrat-{SESSION}-{role}-{secrets.token_hex(3)}", network_mode="none",
            labels=owner_labels(SESSION, "doctortest"), **kwargs)
        created.append(container)
        return container

    try:
        sockmount = create("sockmount", volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "ro"}})
        sockmount.start()
        privileged = create("privileged", privileged=True)
        try:
            privileged.start()
            privileged_runs = True
        except docker.errors.APIError as exc:
            # An engine that lacks a capability itself (this VM's dockerd runs without CAP_SYS_RESOURCE)
            # cannot start any privileged container: privileged asks for every capability.
            if "unable to apply caps" not in str(exc):
                raise
            privileged_runs = False
        done = doctor()
        assert done.returncode == 0, done.stdout  # warnings, not errors
        warns = [line for line in done.stdout.splitlines() if line.startswith("warn  security: container")]
        assert any(sockmount.name in line and "Docker socket /var/run/docker.sock" in line for line in warns), warns
        assert not any(sockmount.name in line and "privileged" in line for line in warns)
        if privileged_runs:
            assert any(privileged.name in line and "runs privileged" in line for line in warns), warns
        else:
            # Not a real fault: a running privileged container cannot exist on this engine, so the check's
            # decision is fed the real `docker inspect` of a running container with Privileged set by hand.
            warnings.warn("this engine cannot start a privileged container: the privileged warning was checked "
                          "on an edited inspect, not end to end", stacklevel=1)
            attrs = client().api.inspect_container(sockmount.id)
            attrs["HostConfig"]["Privileged"] = True
            assert any(f"container {sockmount.name}" in f.message and "runs privileged" in f.message
                       for f in container_risks(sockmount.name, attrs))
    finally:
        for container in created:
            container.remove(force=True)
    assert not any(c.name in f.message for f in check_containers() for c in created)  # gone: no longer reported


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run the disk-threshold test as root (it mounts a tmpfs)")
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def test_free_disk_thresholds_on_small_tmpfs(tmp_path):
    tiny, small = tmp_path / "tiny", tmp_path / "small"
    try:
        _mount_tmpfs(tiny, "8m")
        done = doctor("--lab", str(tiny))
        assert done.returncode == 1
        errors = [line for line in done.stdout.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith(f"error disk: 0.0 GiB free at {tiny} (the lab"), errors
        assert "below 1.0 GiB" in errors[0]
        _mount_tmpfs(small, "2g")
        [finding] = check_lab_disk(small)
        assert finding.level is Level.WARN and "below 10.0 GiB" in finding.message, finding
        [finding] = check_lab_disk(small, warn_bytes=1024**3)  # the thresholds are what decides
        assert finding.level is Level.OK, finding
    finally:
        for mount in (tiny, small):
            if mount.is_mount():
                subprocess.run(["umount", str(mount)], check=True)


def test_layer_depth_reports_and_warns_near_the_limit(store, runc_box):
    lab = f"{SESSION}doctor"
    snap = store.snapshot(runc_box, labels={"lab": lab}, name=f"{SESSION}-doctor-1")
    layers = len(client().api.inspect_image(snap.image_id)["RootFS"]["Layers"])
    findings = check_layers(warn_layers=layers)
    [summary] = [f for f in findings if f.level is Level.OK]
    deepest = int(re.search(r": (\d+) layers", summary.message).group(1))
    assert deepest >= layers
    [warn] = [f for f in findings if f.level is Level.WARN and f"lab {lab}:" in f.message]
    assert f"snapshot {snap.name} has {layers} layers, {125 - layers} short" in warn.message
    assert not [f for f in check_layers(warn_layers=layers + 1) if f"lab {lab}:" in f.message]


def test_self_test_catches_a_sandbox_without_no_new_privileges(image):
    [finding] = check_hardening(SandboxPolicy(image=image, no_new_privileges=False))
    assert finding.level is Level.ERROR
    assert "may gain privileges (NoNewPrivs 0)" in finding.message
    assert "uid" not in finding.message and "CapEff" not in finding.message  # the rest of the policy still holds


def test_gpu_lab_without_gpu_support_is_an_error(image):
    [finding] = check_gpu(client().info(), True, LabConfig(gpus="all"))
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this host has an NVIDIA device: whether its engine can use it is the machine's setup")
    assert finding.level is Level.ERROR and "this lab sets gpus = 'all'" in finding.message, finding
    [finding] = check_gpu(client().info(), True, None)
    assert finding.level is Level.INFO, finding


# The host tools' output formats, as they print them (this machine has no GPU to ask).
NVIDIA_SMI_H100 = "NVIDIA H100 80GB HBM3, 550.54.15\nNVIDIA H100 80GB HBM3, 550.54.15\n"
NVIDIA_SMI_H200 = "NVIDIA H200, 550.54.15\n"
NVIDIA_CTK = "NVIDIA Container Toolkit CLI version {}\ncommit: f202b80a9b9d0db00d9b1d73c0128c8962c55f4d\n"
NVIDIA_CONTAINER_CLI = "cli-version: {0}\nlib-version: {0}\nbuild date: 2024-07-23T14:57+00:00\n"


def _real_nvproxy_drivers() -> set[str]:
    """The list from this machine's own runsc, so the parser meets the real format."""
    listed = subprocess.run(["runsc", "nvproxy", "list-supported-drivers"], capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    drivers = parse_nvproxy_drivers(listed.stdout)
    assert len(drivers) >= 3 and all(d.count(".") >= 1 for d in drivers), listed.stdout
    return drivers


def test_the_nvidia_stack_is_judged_from_the_tools_output():
    supported = _real_nvproxy_drivers()
    driver = sorted(supported)[0]
    gpus = parse_gpus(NVIDIA_SMI_H100.replace("550.54.15", driver))
    assert gpus == [("NVIDIA H100 80GB HBM3", driver)] * 2
    assert parse_toolkit_version(NVIDIA_CTK.format("1.17.8")) == (1, 17, 8)
    assert parse_toolkit_version(NVIDIA_CONTAINER_CLI.format("1.16.1")) == (1, 16, 1)
    gvisor_gpu_lab = LabConfig(gpus="all", runtime="runsc")
    nvproxy = ["--network=none", "--overlay2=none", "--nvproxy"]
    good = GpuStack(gpus=gpus, toolkit=(1, 17, 8), runsc_args=nvproxy, nvproxy_drivers=supported)

    def levels(stack, config=gvisor_gpu_lab):
        return {f.check: (f.level, f.message) for f in stack_findings(stack, config)}

    assert {check: level for check, (level, _) in levels(good).items()} == {
        "nvidia": Level.OK, "toolkit": Level.OK, "nvproxy": Level.OK}
    # A toolkit with known escapes is refused, naming the ones still open in it.
    level, message = levels(replace(good, toolkit=(1, 17, 3)))["toolkit"]
    assert level is Level.ERROR and "CVE-2025-23359" in message and "CVE-2025-23266" in message
    assert "CVE-2024-0132" not in message and "upgrade to 1.17.8" in message
    assert levels(replace(good, toolkit=None))["toolkit"][0] is Level.ERROR
    assert levels(replace(good, toolkit=None), None)["toolkit"][0] is Level.WARN  # no GPU lab asked for it
    # nvproxy: not registered, a driver runsc does not list, a GPU gVisor has not tested.
    level, message = levels(replace(good, runsc_args=nvproxy[:2]))["nvproxy"]
    assert level is Level.ERROR and "without --nvproxy" in message
    assert levels(replace(good, runsc_args=nvproxy[:2]), LabConfig(gpus="all"))["nvproxy"][0] is Level.WARN  # runc lab
    level, message = levels(replace(good, gpus=parse_gpus(NVIDIA_SMI_H100.replace("550.54.15", "999.1.2"))))["nvproxy"]
    assert level is Level.ERROR and "does not support driver 999.1.2" in message
    level, message = levels(replace(good, gpus=parse_gpus(NVIDIA_SMI_H200.replace("550.54.15", driver))))["nvproxy"]
    assert level is Level.WARN and "not NVIDIA H200" in message
    assert levels(replace(good, runsc_args=None))["nvproxy"][0] is Level.INFO
    # No driver: an error only for a lab that asked for GPUs.
    assert levels(replace(good, gpus=None))["nvidia"][0] is Level.ERROR
    assert [(f.check, f.level) for f in stack_findings(replace(good, gpus=[]), None)] == [("nvidia", Level.INFO)]


def test_this_hosts_nvidia_stack_is_read_from_its_tools(image):
    stack = read_stack(client().info())
    assert stack.nvproxy_drivers == _real_nvproxy_drivers()  # the registered runsc was asked
    assert stack.runsc_args is not None and "--overlay2=none" in stack.runsc_args
    findings = check_gpu_stack(client().info(), None)
    if shutil.which("nvidia-smi") is None:  # CI and this VM: no driver, one line saying so
        assert stack.gpus is None and [f.level for f in findings] == [Level.INFO]
        assert "no NVIDIA driver" in findings[0].message
    else:
        assert findings[0].check == "nvidia"


def test_daemon_json_and_socket_mode(tmp_path):
    daemon_json = tmp_path / "daemon.json"
    daemon_json.write_text('{"hosts": ["unix:///var/run/docker.sock", "tcp://0.0.0.0:2375"], '
                           '"seccomp-profile": "unconfined"}')
    messages = [f.message for f in check_daemon_config(daemon_json)]
    assert len(messages) == 2
    assert "listens on tcp://0.0.0.0:2375 without TLS" in messages[0]
    assert '"seccomp-profile": "unconfined"' in messages[1]
    daemon_json.write_text('{"hosts": ["tcp://0.0.0.0:2376"], "tlsverify": true}')
    assert check_daemon_config(daemon_json) == []
    daemon_json.write_text("{not json")
    [finding] = check_daemon_config(daemon_json)
    assert finding.level is Level.WARN and "cannot read" in finding.message

    path = tmp_path / "engine.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        path.chmod(0o660)
        assert check_socket_mode(str(path)) == []
        path.chmod(0o666)
        [finding] = check_socket_mode(str(path))
        assert finding.level is Level.WARN and "world-writable (mode 0666)" in finding.message
    finally:
        server.close()
