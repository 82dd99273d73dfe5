"""Image building: idempotent, offline, and Dockerfile.gpu checked on the local base (no CUDA image here)."""

import pytest

from sandbox.engine import client
from sandbox.images import BASE_IMAGE, build_image, debian_mirror
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION


def test_build_is_a_no_op_when_nothing_changed(image):
    before = client().images.get(image).id
    lines = []
    assert build_image(progress=lines.append) == image
    assert client().images.get(image).id == before
    assert any("up to date" in line for line in lines)


def test_cpu_image_contents(image):
    with Sandbox.start(SandboxPolicy(image=image), session=SESSION) as box:
        result = box.exec(
            "python -c 'import torch, numpy; print(torch.__version__)'; ls /workspace/trainer;"
            "ls /wheelhouse 2>&1 | head -1; stat -c '%U' /workspace; readlink /var/tmp"
        )
        lines = result.stdout.splitlines()
        assert lines[0] == "2.13.0+cpu"
        assert "__init__.py" in lines
        assert "No such file" in result.stdout  # the wheels stayed in the build stage
        assert lines[-2:] == ["agent", "/tmp"]
    history = " ".join(step.get("CreatedBy", "") for step in client().images.get(image).history())
    assert "/wheelhouse" not in history.replace("--find-links /wheelhouse", "")


@pytest.mark.slow
def test_gpu_dockerfile_builds_on_the_local_base():
    tag = f"labrat-sandbox:gpu-check-{SESSION}"
    try:
        assert build_image(gpu=True, base=BASE_IMAGE, tag=tag, progress=lambda line: None) == tag
        with Sandbox.start(SandboxPolicy(image=tag), session=SESSION) as box:
            result = box.exec("python -c 'import torch; print(torch.__version__)'; id -un; echo $NVIDIA_VISIBLE_DEVICES")
            assert result.stdout.split() == ["2.13.0+cpu", "agent", "all"]
    finally:
        client().images.remove(tag, force=True)


def test_debian_mirror_comes_from_apt_sources():
    mirror = debian_mirror()
    assert mirror.startswith(("http://", "https://", "file:/")) and "security" not in mirror
