"""Snapshots on the real engine: round trips, lineage, deep lineages, export/import, gc."""

import subprocess
import tarfile
from pathlib import Path

import pytest

from sandbox.engine import client
from sandbox.errors import FileMissing, FileTooLarge, PathRefused, SandboxError, SnapshotMissing
from sandbox.sandbox import Sandbox
from sandbox.snapshots import SnapshotStore
from tests.conftest import LABRAT, SESSION


def _name(suffix: str) -> str:
    return f"{SESSION}-{suffix}"


def test_round_trip_files_permissions_deletions_and_home(box, store, policy):
    box.exec(
        "printf 'x = 1\\n' > train.py && chmod 750 train.py && mkdir -p data/sub && printf bin > data/sub/b"
        " && ln -s data/sub link && rm ~/.bashrc && echo cfg > ~/.labrat_rc"
    )
    snap = store.snapshot(box, labels={"experiment": "1", "seed": "7"}, name=_name("rt"))
    box.exec("echo changed-after > train.py")  # must not leak into the snapshot
    with store.restore(snap, policy, session=SESSION) as restored:
        listing = restored.exec("stat -c '%n %a %U %F' train.py data/sub/b link; cat train.py; ls -A ~; cat ~/.labrat_rc")
        lines = listing.stdout.splitlines()
        assert lines[0] == "train.py 750 agent regular file"
        assert lines[1] == "data/sub/b 644 agent regular file"
        assert lines[2].startswith("link 777 agent symbolic link")
        assert "x = 1" in listing.stdout and "changed-after" not in listing.stdout
        assert ".bashrc" not in lines and ".profile" in lines  # a deletion is part of the snapshot
        assert lines[-1] == "cfg"
    assert snap.labels == {"experiment": "1", "seed": "7"}
    assert store.get(snap.name).image_id == snap.image_id


def test_one_file_is_read_from_a_snapshot_without_running_it(runc_box, store):
    runc_box.exec("printf 'x = 1\\n' > train.py && head -c 5000 /dev/zero > big && mkdir d && ln -s /etc/passwd link"
                  " && mkfifo fifo")
    snap = store.snapshot(runc_box, name=_name("readfile"))
    containers_before = {c.id for c in client().containers.list(all=True)}
    assert store.read_file(snap, "/workspace/train.py", 1024) == b"x = 1\n"
    assert store.read_file(snap, "/workspace/big", 5000) == bytes(5000)
    with pytest.raises(FileTooLarge, match="5000 bytes, over the 4999-byte limit"):
        store.read_file(snap, "/workspace/big", 4999)
    with pytest.raises(FileMissing, match="does not exist"):
        store.read_file(snap, "/workspace/absent.py", 1024)
    for path in ("/workspace/d", "/workspace/link", "/workspace/fifo"):  # never followed, never opened
        with pytest.raises(PathRefused, match="not a regular file"):
            store.read_file(snap, path, 1 << 20)
    assert {c.id for c in client().containers.list(all=True)} == containers_before  # each reader removed


def test_tmp_is_not_snapshotted(box, store, policy):
    box.exec("echo scratch > /tmp/scratch")
    snap = store.snapshot(box, name=_name("tmp"))
    with store.restore(snap, policy, session=SESSION) as restored:
        assert restored.exec("ls /tmp").stdout.strip() == ""


def test_lineage_parents_and_children(runc_box, store):
    first = store.snapshot(runc_box, name=_name("a"))
    runc_box.write_file("f", "2")
    second = store.snapshot(runc_box, name=_name("b"))
    with store.restore(first, session=SESSION) as branch:
        branch.write_file("f", "branch")
        third = store.snapshot(branch, name=_name("c"))
    assert second.parent_id == first.image_id and third.parent_id == first.image_id
    assert {s.name for s in store.children(first)} == {second.name, third.name}
    assert [s.name for s in store.lineage(third)] == [first.name, third.name]
    assert [s.name for s in store.list() if s.name.startswith(SESSION + "-")][:1] == [first.name]
    assert third.depth == 2 and third.lineage_depth == 2
    with pytest.raises(SandboxError, match="already exists"):
        store.snapshot(runc_box, name=_name("a"))


def test_deep_lineage_stays_restorable_at_every_depth(runc_box, store):
    """300 successive snapshots, each restored from the last; overlay2 would fail past ~125 layers."""
    depth = 300
    snaps = []
    box = runc_box
    try:
        for i in range(1, depth + 1):
            box.exec(f"echo {i} > step && echo {i} >> history")
            snaps.append(store.snapshot(box, labels={"step": str(i)}, name=_name(f"deep-{i}")))
            if box is not runc_box:
                box.close()
            box = store.restore(snaps[-1], session=SESSION)
    finally:
        if box is not runc_box:
            box.close()
    assert max(s.depth for s in snaps) <= store.max_depth
    assert snaps[-1].lineage_depth == depth
    for at in (1, 150, 300):
        with store.restore(snaps[at - 1], session=SESSION) as restored:
            result = restored.exec("cat step; wc -l < history")
            assert result.stdout.split() == [str(at), str(at)]
        image = client().images.get(snaps[at - 1].image_id)
        assert len(image.attrs["RootFS"]["Layers"]) < 100
    assert [s.lineage_depth for s in store.lineage(snaps[-1])] == list(range(1, depth + 1))


def test_export_remove_import_restore(box, store, policy, tmp_path):
    box.write_file("model.py", "weights = 42\n")
    snap = store.snapshot(box, labels={"experiment": "17"}, name=_name("exp"))
    bundle = store.export(snap, tmp_path / "exp17.tar", extra={"ledger": {"metric": 1.25}})
    client().images.remove(snap.image_id, force=True)
    with pytest.raises(SnapshotMissing):
        store.get(snap.name)
    [imported], extra = store.import_(bundle)
    assert imported.image_id == snap.image_id and imported.labels == {"experiment": "17"}
    assert extra == {"ledger": {"metric": 1.25}}
    with store.restore(imported, policy, session=SESSION) as restored:
        assert restored.read_text("model.py") == "weights = 42\n"


def test_tampered_bundle_is_refused(runc_box, store, tmp_path):
    import io

    runc_box.write_file("a", "1")
    bundle = store.export(store.snapshot(runc_box, name=_name("tamper")), tmp_path / "s.tar", extra={"metric": 1.5})

    def tamper(name: str, change) -> Path:
        tampered = tmp_path / f"tampered-{name}.tar"
        with tarfile.open(bundle) as src, tarfile.open(tampered, "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if member.name == name:
                    data = change(data)
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
        return tampered

    with pytest.raises(SandboxError, match="image checksum mismatch"):
        store.import_(tamper("image.tar", lambda data: data[:-2048] + b"\0" * 2048))  # flip the image's tail
    with pytest.raises(SandboxError, match="metadata checksum mismatch"):
        store.import_(tamper("manifest.json", lambda data: data.replace(b'"metric": 1.5', b'"metric": 0.5')))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(SandboxError, match="not a labrat snapshot bundle"):
        store.import_(tmp_path / "junk.tar")


def test_gc_keeps_the_kept_and_their_ancestors(runc_box, store):
    a = store.snapshot(runc_box, name=_name("gc-a"))
    runc_box.write_file("f", "b" * 10_000)
    b = store.snapshot(runc_box, name=_name("gc-b"))
    runc_box.write_file("f", "c" * 20_000)
    c = store.snapshot(runc_box, name=_name("gc-c"))  # a discarded sibling line
    with store.restore(b, session=SESSION) as child:
        child.write_file("g", "d")
        d = store.snapshot(child, name=_name("gc-d"))
    prefix = _name("gc-")
    dry = store.gc(keep=[d], dry_run=True, name_prefix=prefix)
    assert dry.removed == [c.name] and dry.dry_run
    assert store.get(c.name)  # a dry run removes nothing
    report = store.gc(keep=[d], name_prefix=prefix)
    assert report.removed == [c.name] and report.bytes_freed >= 20_000
    with pytest.raises(SnapshotMissing):
        store.get(c.name)
    for kept in (a, b, d):
        with store.restore(kept, session=SESSION) as restored:
            assert restored.exec("true").exit_code == 0


def test_snapshot_refused_over_the_disk_limit(image, store):
    from sandbox.policy import SandboxPolicy

    with Sandbox.start(SandboxPolicy(image=image, disk_bytes=8 * 1024**2), session=SESSION) as box:
        box.exec("head -c 20000000 /dev/zero > balloon")
        with pytest.raises(SandboxError, match="over its disk limit"):
            store.snapshot(box, name=_name("balloon"))
        box.exec("rm balloon")
        assert store.snapshot(box, name=_name("after-cleanup")).layer_bytes < 1024 * 1024


def test_gc_only_touches_its_candidates(runc_box, store):
    mine = store.snapshot(runc_box, labels={"lab": "mine"}, name=_name("lab-mine"))
    runc_box.write_file("x", "1")
    theirs = store.snapshot(runc_box, labels={"lab": "theirs"}, name=_name("lab-theirs"))
    report = store.gc(keep=[], name_prefix=_name("lab-"), lab="mine")
    assert report.removed == [mine.name]
    assert store.get(theirs.name).image_id == theirs.image_id


def test_labrat_smoke_walks_the_sandbox_and_leaves_no_snapshot():
    """`labrat smoke`, as a user runs it: the agent's user, no network, torch, two snapshots, a restore of the
    first one (its file as it was then), and nothing left in the store afterwards."""
    done = subprocess.run([LABRAT, "smoke"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in done.stdout.splitlines()
            if line.count("│") == 4}
    assert rows["who am I"] == "agent" and rows["network"] == "none", rows
    assert rows["torch in container"].endswith(" True"), rows
    assert rows["restore #1, read notes.txt"] == "experiment 1", rows
    assert [s.name for s in SnapshotStore().list() if s.name.startswith("smoke")] == []
