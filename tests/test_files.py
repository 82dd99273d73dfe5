"""read_file / write_file / list_dir confined to the workspace, attacked with every escape we know."""

import pytest

from sandbox.errors import FileMissing, FileTooLarge, PathRefused
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
