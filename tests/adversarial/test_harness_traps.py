"""Traps in what the harness reads back out of the container, planted through the agent's tools.

The harness reads the workspace after every experiment (a manifest, then the changed source files, for
the ledger's sources and diff), the checkpoint and summary out of the training container, and shows
all of it again (history tools, `labrat show` / `diff` / `log` / `status`, `labrat export`). Planted
here: symlinks to host-ish paths (/etc/shadow, /proc/self/environ, `../../`), `..` paths, a FIFO (which
must never block a read), a 200 MB file, binary files, file names with terminal escapes, newlines and
invalid UTF-8, a checkpoint and a summary that are symlinks out of the training container, a file
swapped for a FIFO, a symlink or a directory between the manifest and the read, and a workspace that
balloons past the disk limit. The harness must never follow a path out of the container, never hang,
keep the ledger small, and print nothing that drives a terminal.

Experiments are deliberately broken (they crash in a second instead of training), so none of them is
kept and the traps never become the base of later tests.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from harness.text import printable
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import TRAIN, Attacker
from tests.conftest import LABRAT, SESSION

EXPERIMENT_BOUND = 180  # seconds: generous on a loaded machine; a blocked read would never finish at all
# File names as bytes (the shell writes them with printf), and how the ledger's JSON gives them back.
EVIL = b"evil\x1b[2J\x07\n.py"
NEWLINES = b"name\nwith\nnewlines.py"
BAD_UTF8 = b"bad\xff\xfeutf8.py"
C1 = b"c1\xc2\x9bcsi.py"
# A train.py that plants, where the harness will read the checkpoint and the summary, symlinks out of the
# training container, and prints terminal escapes into the log.
PLANTER = r'''import argparse, os
parser = argparse.ArgumentParser()
parser.add_argument("--out")
args, _ = parser.parse_known_args()
os.makedirs(args.out, exist_ok=True)
os.symlink("/etc/shadow", os.path.join(args.out, "ckpt.pt"))
os.symlink("/proc/self/environ", os.path.join(args.out, "summary.json"))
print("\x1b[2J\x1b]0;pwned\x07\x9b31m planted \r")
raise SystemExit(0)  # a "successful" run, so the harness goes on to read what it left
'''


BROKEN = 'raise SystemExit("deliberately broken: not kept")\n'


def shell_name(name: bytes) -> str:
    """A bash word that expands to exactly these bytes."""
    return "\"$(printf '" + "".join(f"\\{b:03o}" for b in name) + "')\""


def terminal_controls(data: bytes) -> list[str]:
    """Bytes (or UTF-8 sequences) that a terminal would act on: C0 but newline and tab, DEL, and C1 as UTF-8."""
    found = {f"{b:#04x}" for b in data if (b < 0x20 and b not in (0x09, 0x0A)) or b == 0x7F}
    text = data.decode("utf-8", "replace")
    found |= {f"U+{ord(c):04X}" for c in text if 0x80 <= ord(c) < 0xA0}
    return sorted(found)


def labrat(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([LABRAT, *args], capture_output=True, timeout=timeout)


def run_trapped_experiment(attack: Attacker, description: str) -> tuple[object, float]:
    started = time.monotonic()
    experiment = attack.run_experiment(description)
    seconds = time.monotonic() - started
    assert seconds < EXPERIMENT_BOUND, seconds
    return experiment, seconds


def test_links_fifos_and_evil_names_are_recorded_never_followed_and_print_safely(attack, monkeypatch, tmp_path):
    """One experiment carries the traps of names and links; every reader of its record is checked."""
    setup = " && ".join([
        "cd /workspace",
        "ln -s /etc/shadow shadow.txt", "ln -s /proc/self/environ environ.py", "ln -s ../../ up",
        "ln -s ../../etc/passwd uppw.py", "ln -s /workspace/trainer/train.py inside.py",
        "mkfifo notes.txt",
        "head -c 3000 /dev/urandom > blob.py && printf 'a\\0b' >> blob.py",
        f"printf 'x = 1\\n' > {shell_name(EVIL)}", f"printf 'y = 2\\n' > {shell_name(NEWLINES)}",
        f"printf 'z = 3\\n' > {shell_name(BAD_UTF8)}", f"printf 'w = 4\\n' > {shell_name(C1)}",
        "printf 'print(\"\\033[31mred\\007\\r\")\\n' > escapes.py",
        "echo fifo later > swap_fifo.py && echo link later > swap_link.py && echo dir later > swap_dir.py",
        "(ln -sf /etc/shadow trainer/train.py 2>/dev/null; true)",  # the trainer directory is root's
    ])
    assert not attack.bash(setup).is_error
    assert not attack.edit("create", TRAIN, file_text=PLANTER).is_error
    assert not attack.bash("test -f trainer/train.py && ! test -L trainer/train.py").is_error

    # The tools refuse every path out, through links or `..`, and a FIFO at once (a read would block).
    for path, refusal in [("shadow.txt", "symlink shadow.txt -> /etc/shadow leaves the workspace"),
                          ("environ.py", "symlink environ.py -> /proc/self/environ leaves the workspace"),
                          ("uppw.py", "path leaves the workspace"), ("up/etc/passwd", "path leaves the workspace"),
                          ("../../etc/shadow", "is outside the workspace"),
                          ("/proc/self/environ", "outside the workspace"),
                          ("notes.txt", "not a regular file: notes.txt")]:
        started = time.monotonic()
        result = attack.edit("view", path)
        assert result.is_error and refusal in result.text, (path, result.text)
        assert time.monotonic() - started < 30
    assert attack.edit("view", "inside.py").text.startswith("     1\timport argparse")  # inside: followed
    written = attack.edit("create", "up/tmp/planted.txt", file_text="x")
    assert written.is_error and "leaves the workspace" in written.text
    assert attack.bash("ls /tmp/planted.txt", timeout=10).is_error

    # Between the harness's manifest and its reads, three files become a FIFO, a link out and a directory.
    # (The race is forced: the real manifest runs, then the swap runs in the real container, then the reads.)
    box = attack.box
    real_manifest = box.manifest

    def manifest_then_swap(*args, **kwargs):
        entries = real_manifest(*args, **kwargs)
        box.exec("rm swap_fifo.py swap_link.py swap_dir.py && mkfifo swap_fifo.py && ln -s /etc/shadow swap_link.py"
                 " && mkdir swap_dir.py")
        return entries

    monkeypatch.setattr(box, "manifest", manifest_then_swap)
    description = "traps: [bold red]links[/], a FIFO, [/] evil names \x1b[2J\x07\u009b"
    experiment, _ = run_trapped_experiment(attack, description)

    # The planted checkpoint and summary links were refused: the harness read nothing outside the container.
    assert experiment.status == "crash", experiment.log_tail
    assert "training wrote no usable checkpoint: symlink" in experiment.log_tail
    assert "/ckpt.pt -> /etc/shadow leaves the workspace" in experiment.log_tail
    assert experiment.summary_json is None and experiment.eval_json is None
    assert experiment.snapshot  # the candidate was snapshotted before training
    # Printable, and no rich markup (a "[/]" crashed `labrat log` and `labrat status`: they render it as markup).
    assert experiment.description == "traps: (bold red)links(/), a FIFO, (/) evil names \ufffd(2J\ufffd\ufffd"

    sources = json.loads(experiment.sources_json)
    names = set(sources)
    assert not {"shadow.txt", "environ.py", "uppw.py", "inside.py", "up", "notes.txt"} & names  # links, FIFOs: skipped
    assert sources["blob.py"] == "<binary file, 3003 bytes>\n"
    assert sources[EVIL.decode()] == "x = 1\n" and sources[NEWLINES.decode()] == "y = 2\n"
    assert sources[C1.decode()] == "w = 4\n"
    assert sources[BAD_UTF8.decode("utf-8", "surrogateescape")].startswith("<not recorded: ")
    assert sources["swap_fifo.py"] == "<not recorded: not a regular file: swap_fifo.py>\n"
    assert sources["swap_link.py"] == "<not recorded: symlink swap_link.py -> /etc/shadow leaves the workspace>\n"
    assert sources["swap_dir.py"] == "<not recorded: is a directory: swap_dir.py>\n"
    assert "root:" not in experiment.sources_json and "PATH=" not in experiment.sources_json
    assert "import argparse" in sources[TRAIN]

    # What the agent sees of it: no terminal controls, and a file name cannot forge a line of the diff.
    shown = {name: attack.call(name, tool_input) for name, tool_input in [
        ("show_experiment", {"id": experiment.id}), ("diff", {"a": 0, "b": experiment.id}),
        ("list_experiments", {})]}
    for name, result in shown.items():
        assert not result.is_error, (name, result.text)
        assert not terminal_controls(result.text.encode()), (name, terminal_controls(result.text.encode()))
    diff = shown["diff"].text
    assert f"+++ #{experiment.id}/evil\ufffd[2J\ufffd\\n.py\n" in diff
    assert f"+++ #{experiment.id}/name\\nwith\\nnewlines.py\n" in diff
    assert f"+++ #{experiment.id}/bad\ufffd\ufffdutf8.py\n" in diff
    assert f"+++ #{experiment.id}/c1\ufffdcsi.py\n" in diff
    assert '+print("\ufffd[31mred\ufffd' in diff
    assert not [line for line in diff.splitlines() if line in ("with", "newlines.py", ".py")]
    assert "planted" in shown["show_experiment"].text and "\ufffd[2J" in shown["show_experiment"].text

    # The CLI reads the ledger while the session holds the lab's lock (show, diff, log and status never lock it).
    lab = str(attack.session.lab)
    for args in (["show", str(experiment.id)], ["diff", "0", str(experiment.id)], ["log"], ["status"]):
        run = labrat(*args, "--lab", lab)
        assert run.returncode == 0, (args, run.stderr[-2000:])
        assert not terminal_controls(run.stdout), (args, terminal_controls(run.stdout))
        assert not terminal_controls(run.stderr), (args, terminal_controls(run.stderr))
    assert "(/) evil names" in labrat("log", "--lab", lab).stdout.decode()
    cli_diff = labrat("diff", "0", str(experiment.id), "--lab", lab).stdout.decode()
    assert "name\\nwith\\nnewlines.py" in cli_diff and "evil\ufffd[2J\ufffd\\n.py" in cli_diff

    # Export is a host-side operation (one runtime is enough): the bundle's members are all relative, and
    # so are those of the snapshot's own layer, where the evil names are.
    if attack.runtime == "runc":
        bundle = tmp_path / "traps.tar"
        run = labrat("export", str(experiment.id), "-o", str(bundle), "--lab", lab, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert not terminal_controls(run.stdout + run.stderr)
        check_bundle(bundle, experiment)
        bundle.unlink()  # ~1.3 GB (the sandbox image's layers): not worth keeping in pytest's tmp dirs


def safe_member(name: str) -> bool:
    return not name.startswith("/") and ".." not in Path(name).parts


def check_bundle(bundle: Path, experiment) -> None:
    with tarfile.open(bundle) as outer:
        assert sorted(outer.getnames()) == ["image.tar", "manifest.json"]
        manifest = json.loads(outer.extractfile("manifest.json").read())
        assert [row["id"] for row in manifest["extra"]["experiments"]] == [experiment.id]
        with tarfile.open(fileobj=outer.extractfile("image.tar")) as image:
            members = image.getnames()
            assert members and all(safe_member(name) for name in members), [n for n in members if not safe_member(n)]
            saved, = json.loads(image.extractfile("manifest.json").read())
            top = saved["Layers"][-1]  # the snapshot's own layer: the agent's files
            with tarfile.open(fileobj=image.extractfile(top)) as layer:
                names = layer.getnames()
    assert all(safe_member(name) for name in names), [n for n in names if not safe_member(n)]
    raw = {name.encode("utf-8", "surrogateescape") for name in names}
    assert b"workspace/" + EVIL in raw and b"workspace/" + BAD_UTF8 in raw


def test_a_huge_file_and_a_fifo_keep_the_record_small_and_the_run_unblocked(attack):
    """200 MB in the workspace and a FIFO where a source file would be: the experiment finishes, the ledger
    keeps a placeholder for the big file, and its row stays small."""
    setup = ("cd /workspace && head -c 200000000 /dev/zero > big.bin && mkfifo pipe.py && mkfifo trainer_notes.txt"
             " && head -c 2000000 /dev/urandom > medium.dat && printf 'not utf-8: \\377\\376\\n' > latin.py")
    assert not attack.bash(setup, timeout=300).is_error
    assert not attack.edit("create", TRAIN, file_text=BROKEN).is_error
    experiment, seconds = run_trapped_experiment(attack, "traps: 200 MB, FIFOs, binary")

    assert experiment.status == "crash" and "deliberately broken" in experiment.log_tail
    sources = json.loads(experiment.sources_json)
    assert sources["big.bin"] == "<not recorded: 200000000 bytes>\n"
    assert sources["medium.dat"] == "<not recorded: 2000000 bytes>\n"
    assert sources["latin.py"] == "not utf-8: \ufffd\ufffd\n"
    assert "pipe.py" not in sources and "trainer_notes.txt" not in sources
    # The diff removes the shipped train.py (a "-" per line) and adds a line or two per trap: nothing more.
    shipped = (Path(__file__).parents[2] / "trainer" / "train.py").read_text()
    assert len(experiment.sources_json) < 200_000 and len(experiment.diff) < len(shipped) + shipped.count("\n") + 5_000
    assert "+<not recorded: 200000000 bytes>" in experiment.diff
    snapshot = SnapshotStore().get(experiment.snapshot)
    assert 200_000_000 <= snapshot.layer_bytes <= attack.box.policy.disk_bytes
    # The working container is back to the base: the 200 MB are gone from it.
    assert attack.bash("ls big.bin", timeout=30).is_error


def test_a_ballooning_workspace_stops_at_the_disk_limit_and_is_never_snapshotted(attack):
    """100 MB at a time: the write that crosses the limit (disk_gb = 0.25 here) is stopped, and the experiment
    is recorded as a crash that says why; no snapshot past the limit reaches the store."""
    limit = attack.box.policy.disk_bytes
    assert limit == int(0.25 * 1024**3)
    assert not attack.edit("create", TRAIN, file_text=BROKEN).is_error
    results = [attack.bash(f"head -c 100000000 /dev/zero > balloon{i}.bin", timeout=120) for i in range(3)]
    assert [r.is_error for r in results[:2]] == [False, False], [r.text for r in results]
    # The third write crosses the limit: the exec's disk check stops it when it runs in time (it polls); the
    # snapshot's check below never misses.
    assert not results[2].is_error or f"exceed the disk limit of {limit} bytes" in results[2].text, results[2].text
    lab = attack.session.lab_id  # this lab's snapshots only: other labs on the engine come and go
    before = {s.name for s in SnapshotStore().list(lab=lab)}

    experiment, _ = run_trapped_experiment(attack, "balloon: 300 MB in the workspace")

    assert experiment.status == "crash" and experiment.snapshot is None
    assert experiment.log_tail.startswith("labrat: refusing to snapshot")
    assert f"over its disk limit of {limit}" in experiment.log_tail
    assert {s.name for s in SnapshotStore().list(lab=lab)} == before  # nothing was committed
    lab_snapshots = [s for s in SnapshotStore().list() if s.name.startswith(attack.session.lab_id)]
    for snap in lab_snapshots:
        assert SnapshotStore().get(snap.name).layer_bytes <= limit, snap.name
    # The agent is told, and the workspace is usable again (reset to the base).
    outcome = attack.call("show_experiment", {"id": experiment.id})
    assert "refusing to snapshot" in outcome.text
    after = attack.bash("ls balloon0.bin 2>/dev/null | wc -l")
    assert not after.is_error and after.text.startswith("0\n"), after.text


def test_directories_nested_too_deep_to_walk_end_the_experiment_with_a_clear_reason(attack):
    """1,500 nested directories: the manifest cannot walk them (it used to die of a RecursionError traceback);
    the experiment is recorded as a crash that says why, and the workspace is reset."""
    deep = "$(printf 'd/%.0s' $(seq 1500))"
    assert not attack.bash(f'mkdir -p "{deep}" && echo x > "{deep}x.py"', timeout=120).is_error
    assert not attack.edit("create", TRAIN, file_text=BROKEN).is_error
    experiment, _ = run_trapped_experiment(attack, "traps: 1,500 nested directories")

    assert experiment.status == "crash"
    assert experiment.log_tail.startswith("labrat: directories below . are nested too deep to walk"), \
        experiment.log_tail
    assert "Traceback" not in experiment.log_tail
    assert attack.bash("ls d 2>/dev/null | wc -l").text.startswith("0\n")


def test_a_workspace_that_grows_across_kept_snapshots_stays_within_the_disk_limit(image):
    """Each kept experiment restores the last snapshot and could add up to the limit again: the store counts the
    layers a snapshot descends from, so the workspace (and the image every later container starts from) stays
    within disk_gb."""
    policy = SandboxPolicy(image=image, disk_bytes=250 * 1024**2)
    store = SnapshotStore()
    try:
        with Sandbox.start(policy, session=SESSION) as box:
            assert box.exec("head -c 200000000 /dev/zero > /workspace/a.bin").ok
            first = store.snapshot(box, name=f"{SESSION}-grow1")
        with store.restore(first, policy, session=SESSION) as box:
            assert box.exec("head -c 200000000 /dev/zero > /workspace/b.bin").ok  # 400 MB in the workspace
            with pytest.raises(Exception, match="disk limit"):
                store.snapshot(box, name=f"{SESSION}-grow2")
    finally:
        store.gc(keep=[], name_prefix=f"{SESSION}-grow")


def test_printable_leaves_text_and_replaces_every_control():
    assert printable("a\tb\nc é ✓ \u202e") == "a\tb\nc é ✓ \u202e"
    assert printable("\x1b[2J\x07\r\x00\x7f\x9b\ud800\udcff") == "\ufffd[2J" + "\ufffd" * 7
