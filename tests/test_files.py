"""read_file / write_file / list_dir confined to the workspace, attacked with every escape we know."""

import io
import tarfile

import pytest

from sandbox.errors import FileMissing, FileTooLarge, PathRefused, SandboxError
from sandbox.files import workspace_relpath
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION


def test_round_trip_text_and_binary(box):
    box.write_file("notes/a.txt", "héllo\n")
    assert box.read_file("notes/a.txt") == "héllo\n".encode()
    blob = bytes(range(256)) * 1000
    box.write_file("/workspace/blob.bin", blob)
    assert box.read_file("blob.bin") == blob
    owner = box.exec("stat -c '%U %a' notes/a.txt blob.bin").stdout.split("\n")
    assert owner[:2] == ["agent 644", "agent 644"]


def test_write_keeps_an_existing_files_mode(box):
    box.exec("printf old > run.sh && chmod 755 run.sh")
    box.write_file("run.sh", "#!/bin/sh\necho new\n")
    assert box.exec("./run.sh").stdout == "new\n"


def test_list_dir(box):
    box.write_file("d/x.py", "x")
    box.exec("mkdir d/sub && ln -s x.py d/link")
    entries = {e.name: e.kind for e in box.list_dir("d")}
    assert entries == {"x.py": "file", "sub": "dir", "link": "symlink"}


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../etc/passwd", "/workspace/../etc/shadow",
                                  "bad\x00name", ""])
def test_lexical_escapes_are_refused_before_reaching_the_container(path):
    with pytest.raises(PathRefused):
        workspace_relpath(path, "/workspace")


def test_paths_inside_are_accepted():
    assert workspace_relpath("/workspace/a/./b/../c.txt", "/workspace") == "a/c.txt"
    assert workspace_relpath("a//b", "/workspace") == "a/b"
    assert workspace_relpath("/workspace", "/workspace") == "."


@pytest.fixture
def trapped(box):
    """A workspace with every kind of symlink trap an agent can plant."""
    box.exec(
        "mkdir -p inner && echo inside > inner/ok.txt"
        " && ln -s /etc abs_dir"  # absolute symlink to a directory outside
        " && ln -s /etc/passwd abs_file"  # absolute symlink to a file outside
        " && ln -s ../.. inner/up"  # relative symlink climbing out
        " && ln -s ../home/agent/.bashrc rel_out"  # relative, out via the parent
        " && ln -s inner/ok.txt good_link"  # stays inside: allowed
        " && ln -s /workspace/inner abs_inside"  # absolute but inside: allowed
        " && ln -s loop1 loop2 && ln -s loop2 loop1"  # a cycle
        " && mkfifo pipe"
    )
    return box


@pytest.mark.parametrize("path", ["abs_dir/passwd", "abs_file", "inner/up/etc/passwd", "rel_out", "inner/up"])
def test_symlinks_that_leave_the_workspace_are_refused_for_read(trapped, path):
    with pytest.raises(PathRefused):
        trapped.read_file(path)


@pytest.mark.parametrize("path", ["abs_dir/evil", "abs_file", "inner/up/tmp/evil", "rel_out"])
def test_symlinks_that_leave_the_workspace_are_refused_for_write(trapped, path):
    with pytest.raises(PathRefused):
        trapped.write_file(path, "pwned")
    # And nothing was written through the link.
    assert trapped.exec("ls /tmp/evil /etc/evil 2>/dev/null | wc -l").stdout.strip() == "0"


def test_listing_through_an_escaping_symlink_is_refused(trapped):
    with pytest.raises(PathRefused):
        trapped.list_dir("abs_dir")


def test_symlinks_that_stay_inside_are_followed(trapped):
    assert trapped.read_file("good_link") == b"inside\n"
    assert trapped.read_file("abs_inside/ok.txt") == b"inside\n"
    trapped.write_file("abs_inside/new.txt", "n")
    assert trapped.exec("cat inner/new.txt").stdout == "n"


def test_symlink_cycles_and_special_files_are_refused(trapped):
    with pytest.raises(PathRefused, match="symbolic links"):
        trapped.read_file("loop1")
    with pytest.raises(PathRefused, match="regular file"):
        trapped.read_file("pipe")  # a reader must never block on a FIFO
    with pytest.raises(PathRefused, match="directory"):
        trapped.read_file("inner")


def test_missing_file(box):
    with pytest.raises(FileMissing):
        box.read_file("does/not/exist.txt")


def test_size_limits(image, runtime):
    policy = SandboxPolicy(image=image, runtime=runtime, max_file_bytes=64 * 1024)
    with Sandbox.start(policy, session=SESSION) as box:
        with pytest.raises(FileTooLarge):
            box.write_file("big.bin", b"x" * (64 * 1024 + 1))
        box.exec("head -c 100000 /dev/zero > big.bin")
        with pytest.raises(FileTooLarge):
            box.read_file("big.bin")
        assert len(box.read_file("big.bin", max_bytes=200_000)) == 100_000


def test_the_training_core_is_read_only_but_train_py(box):
    box.write_file("trainer/train.py", "# edited by the agent\n")
    assert box.read_file("trainer/train.py") == b"# edited by the agent\n"
    for protected in ("trainer/contract.py", "trainer/prepare.py", "trainer/evaluate.py", "trainer/new_module.py"):
        with pytest.raises(PathRefused, match="permission denied"):
            box.write_file(protected, "tampered")
    result = box.exec("rm -f trainer/prepare.py; echo x >> trainer/contract.py; mv trainer/train.py trainer/t.py")
    assert result.exit_code != 0
    assert box.exec("ls trainer").stdout.split() == ["__init__.py", "contract.py", "eval_worker.py", "evaluate.py",
                                                     "hardware.py", "prepare.py", "synthetic.py", "train.py"]


def test_listing_a_large_directory_is_complete_json(runc_box):
    runc_box.exec("mkdir many && cd many && for i in $(seq 3000); do : > \"file-with-a-longish-name-$i.txt\"; done")
    entries = runc_box.list_dir("many")
    assert len(entries) == 3000 and all(e.kind == "file" for e in entries)


# ---- pack_dir / unpack_dir: how a training run's compile cache leaves one container and enters the next ----
def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


def test_pack_keeps_regular_files_only_and_unpack_restores_them(runc_box, image):
    runc_box.exec("mkdir -p c/inductor/ab c/triton && printf kernel > c/inductor/ab/k.so && chmod 755 c/inductor/ab/k.so"
                  " && head -c 300000 /dev/urandom > c/triton/blob && ln -s /etc/passwd c/passwd && mkfifo c/fifo"
                  " && ln -s ../c c/inductor/loop")
    archive = b"".join(runc_box.pack_dir("c", 1 << 20))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        assert sorted(m.name for m in tar) == ["inductor/ab/k.so", "triton/blob"]
        assert all(m.isreg() for m in tar)
    with Sandbox.start(SandboxPolicy(image=image), session=SESSION, role="test") as fresh:
        assert fresh.unpack_dir("cache", [archive[:1000], archive[1000:]], 1 << 20) == {"bytes": 300006, "skipped": 0}
        assert fresh.read_file("cache/inductor/ab/k.so") == b"kernel"
        assert fresh.read_file("cache/triton/blob") == runc_box.read_file("c/triton/blob")
        assert fresh.exec("stat -c '%U %a' cache/inductor/ab/k.so").stdout.strip() == "agent 755"  # still loadable


def test_pack_refuses_a_directory_over_its_bound_and_a_missing_one(runc_box):
    runc_box.exec("mkdir big && head -c 200000 /dev/zero > big/a && head -c 200000 /dev/zero > big/b")
    with pytest.raises(FileTooLarge, match="over the 300000-byte limit"):
        b"".join(runc_box.pack_dir("big", 300_000))
    with pytest.raises(FileMissing):
        b"".join(runc_box.pack_dir("nothing-here", 1 << 20))


def test_unpack_skips_links_devices_and_names_that_leave_its_directory(runc_box):
    archive = _tar((_member("ok/file"), b"fine"), (_member("../escaped"), b"x"), (_member("/etc/evil"), b"x"),
                   (_member("ok/../../up"), b"x"), (_member("link", tarfile.SYMTYPE, "/etc"), b""),
                   (_member("link/passwd"), b"x"),  # through the link just skipped: lands as a plain file, if at all
                   (_member("hard", tarfile.LNKTYPE, "/etc/passwd"), b""), (_member("dev", tarfile.CHRTYPE), b""),
                   (_member("ok/file"), b"second copy"))  # never over an entry that exists
    answer = runc_box.unpack_dir("cache", [archive], 1 << 20)
    assert answer["skipped"] == 7
    assert runc_box.read_file("cache/ok/file") == b"fine"
    listing = runc_box.exec("cd cache && find . | sort").stdout.split()
    assert listing == [".", "./link", "./link/passwd", "./ok", "./ok/file"]
    assert runc_box.exec("test -d cache/link && ! test -L cache/link && ls /workspace/escaped /workspace/up /etc/evil"
                         " 2>&1 | grep -c 'No such'").stdout.strip() == "3"


def test_unpack_refuses_an_archive_over_its_bound_and_garbage(runc_box):
    archive = _tar((_member("a"), b"x" * 5000), (_member("b"), b"y" * 5000))
    with pytest.raises(FileTooLarge, match="over the 8000-byte limit"):
        runc_box.unpack_dir("cache", [archive], 8000)
    with pytest.raises(SandboxError):
        runc_box.unpack_dir("garbage", [b"this is not a tar archive" * 100], 1 << 20)
