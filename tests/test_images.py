"""Image building: idempotent, offline, and Dockerfile.gpu checked on the local base (no CUDA image here)."""

import json
import tarfile

import pytest

from harness.image import BASE_IMAGE, build_image, debian_mirror
from sandbox.engine import client
from sandbox.images import ContextFile, build_dockerfile, import_rootfs, inspect_image
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION


def test_build_is_a_no_op_when_nothing_changed(image):
    before = client().images.get(image).id
    lines = []
    assert build_image(on_step=lines.append) == image
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


# The gpu config's code path, shrunk to run in seconds on a CPU: bf16 autocast and torch.compile on.
GPU_PATH_ON_CPU = ["--config", "gpu", "--device", "cpu", "--steps", "3", "--set", "n_layer=1", "--set", "n_embd=64",
                   "--set", "n_head=2", "--set", "seq_len=64", "--set", "batch_size=2"]


@pytest.mark.slow
def test_gpu_image_builds_on_the_local_base_and_compiles_the_gpu_config_offline():
    """A PyTorch runtime image has no C compiler, so the first compiled step crashed ("Failed to find C
    compiler"). The GPU image carries one: its compiled code path runs here on CPU, as the agent's user,
    with no network, in the sandbox."""
    tag = f"labrat-sandbox:gpu-check-{SESSION}"
    try:
        assert build_image(gpu=True, base=BASE_IMAGE, tag=tag, on_step=lambda line: None) == tag
        with Sandbox.start(SandboxPolicy(image=tag, memory_bytes=4 << 30), session=SESSION) as box:
            result = box.exec("python -c 'import torch; print(torch.__version__)'; id -un; echo $NVIDIA_VISIBLE_DEVICES")
            assert result.stdout.split() == ["2.13.0+cpu", "agent", "all"]  # the same torch as the CPU image
            prepared = box.exec("python -m trainer.prepare --out /tmp/data --train-bytes 200000 --val-bytes 20000")
            assert prepared.ok, prepared.stderr
            trained = box.exec(["python", "-m", "trainer.train", "--data", "/tmp/data", "--out", "/tmp/out",
                                *GPU_PATH_ON_CPU], timeout=900)
            assert trained.ok, trained.stderr[-3000:]
            summary = json.loads(box.exec("cat /tmp/out/summary.json").stdout)
            assert summary["compiled"] is True and summary["steps"] == 3 and summary["config"]["dtype"] == "bfloat16"
            assert "(compiled)" in trained.stdout
            # Compiled means inductor generated and built C++ here, and loaded it: the sandbox's /tmp is noexec,
            # so its cache is in the agent's home (Dockerfile.gpu), which holds the compiled kernels.
            built = box.exec("find /home/agent/.cache/torchinductor -name '*.so' | head -1")
            assert built.stdout.strip(), "inductor left no compiled kernel"
    finally:
        client().images.remove(tag, force=True)


def test_debian_mirror_comes_from_apt_sources():
    mirror = debian_mirror()
    assert mirror.startswith(("http://", "https://", "file:/")) and "security" not in mirror


def test_builder_skips_an_identical_context_and_rebuilds_a_changed_one(image, tmp_path):
    (tmp_path / "Dockerfile").write_text(f"FROM {image}\nCOPY note.txt /note.txt\n")
    note = tmp_path / "note.txt"
    note.write_text("one")
    context = [ContextFile("Dockerfile", tmp_path / "Dockerfile"), ContextFile("note.txt", note)]
    tag = f"labrat-build-check:{SESSION}"
    lines = []
    try:
        assert build_dockerfile(tag, context, base=image, on_step=lines.append) == tag
        first = inspect_image(tag)["Id"]
        assert build_dockerfile(tag, context, base=image, on_step=lines.append) == tag
        assert inspect_image(tag)["Id"] == first and "up to date" in lines[-1]
        note.write_text("two")
        build_dockerfile(tag, context, base=image, on_step=lines.append)
        assert inspect_image(tag)["Id"] != first
    finally:
        client().images.remove(tag, force=True)


def test_rootfs_tarball_imports_as_an_image(tmp_path):
    (tmp_path / "hello").write_text("hi")
    rootfs = tmp_path / "rootfs.tar"
    with tarfile.open(rootfs, "w") as tar:
        tar.add(tmp_path / "hello", arcname="hello")
    name = f"labrat-import-check:{SESSION}"
    assert inspect_image(name) is None
    try:
        assert import_rootfs(rootfs, name) == name
        assert inspect_image(name)["RootFS"]["Layers"]
    finally:
        client().images.remove(name, force=True)
