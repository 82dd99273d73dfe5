"""Engine faults caused for real: each surfaces as one actionable line, never a traceback."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import docker.errors
import pytest

from sandbox import engine
from sandbox.engine import client, engine_errors, require_runtime
from sandbox.errors import EngineUnavailable, ImageMissing, RuntimeUnavailable
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import LABRAT, SESSION



@pytest.fixture
def docker_host(monkeypatch):
    """Point the process at another engine address for one test (a real env var, real sockets)."""

    def use(address: str) -> None:
        monkeypatch.setenv("DOCKER_HOST", address)
        engine.reset_client()

    yield use
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    engine.reset_client()


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message
    assert len(message) < 300


def test_daemon_down(docker_host, tmp_path):
    docker_host(f"unix://{tmp_path}/no-daemon.sock")
    with pytest.raises(EngineUnavailable, match="not reachable") as info:
        Sandbox.start(session=SESSION)
    _one_line(str(info.value))
    assert "start it" in str(info.value)


def test_daemon_dying_mid_request(docker_host, tmp_path):
    # A socket that accepts and hangs up at once: what a daemon being killed looks like to a client.
    path = tmp_path / "dying.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def hang_up():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    docker_host(f"unix://{path}")
    with pytest.raises(EngineUnavailable) as info:
        client()
    _one_line(str(info.value))
    server.close()


def test_cli_prints_one_line_and_exit_code_2_when_the_daemon_is_down(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/none.sock"}
    done = subprocess.run([LABRAT, "run", "--lab", str(tmp_path / "lab")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("labrat: error: the Docker engine is not reachable")
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged user")
def test_socket_permission_denied_names_the_docker_group():
    # A real unprivileged user against the real root:docker 0660 socket.
    code = "from sandbox.engine import client\nfrom sandbox.errors import SandboxError\n" \
           "try:\n client()\nexcept SandboxError as e:\n print(e)"
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
        env={**os.environ, "HOME": "/tmp"},
    )
    assert "permission denied on the Docker socket" in done.stdout, done.stdout + done.stderr
    assert "docker' group" in done.stdout


def test_missing_image():
    with pytest.raises(ImageMissing, match="labrat image build") as info:
        Sandbox.start(SandboxPolicy(image="labrat-sandbox:does-not-exist"), session=SESSION)
    _one_line(str(info.value))


def test_unknown_runtime_is_one_line_with_the_fix():
    with pytest.raises(RuntimeUnavailable, match="daemon.json"):
        require_runtime("gvisor-not-registered")
    # The engine's own refusal is translated too (a create that names an unregistered runtime).
    with pytest.raises(RuntimeUnavailable, match="daemon.json"), engine_errors():
        client().containers.create("labrat-sandbox:cpu", runtime="gvisor-not-registered")


def test_gpus_without_an_nvidia_runtime(image):
    if "nvidia" in client().info().get("Runtimes", {}):
        pytest.skip("this engine has an NVIDIA runtime; the refusal cannot be caused here")
    with pytest.raises(RuntimeUnavailable, match="NVIDIA") as info:
        Sandbox.start(SandboxPolicy(image=image, gpus="all"), session=SESSION, role="gpu")
    _one_line(str(info.value))
    left = client().containers.list(all=True, filters={"label": [f"labrat.session={SESSION}", "labrat.role=gpu"]})
    assert left == []


def test_gpu_list_becomes_a_device_request():
    assert SandboxPolicy(gpus="0,1").gpus == ["0", "1"]
    assert SandboxPolicy(gpus="all").gpus == "all"
    assert SandboxPolicy(gpus=None).gpus is None


def test_policy_refuses_secrets_in_the_environment():
    with pytest.raises(ValueError, match="secret"):
        SandboxPolicy(env={"ANTHROPIC_API_KEY": "sk-..."})
    assert SandboxPolicy(env={"OMP_NUM_THREADS": "2"}).env == {"OMP_NUM_THREADS": "2"}


def test_unexpected_engine_errors_are_not_swallowed():
    with pytest.raises(docker.errors.APIError), engine_errors():
        client().api.inspect_container("definitely-not-a-container-" + SESSION)
