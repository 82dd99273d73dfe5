"""Resource attacks through the agent's tools: fork and memory bombs, disk fills, output floods, endless
loops and sleeps, and processes that try to outlive their exec or their experiment, from bash in the
working container and from train.py in the training container. The lab's limits are small
(conftest.ATTACK_LAB: 1 GB memory, 0.25 GB disk, a 10 s all-in budget, 20 s under gVisor), so each attack hits its limit in
seconds; every test checks that the session goes on afterwards without any help from the test."""

from __future__ import annotations

import json
import time

from harness.runner import LOG_TAIL_CHARS
from harness.tools import MODEL_OUTPUT_CHARS
from sandbox.engine import LABEL_ROLE, LABEL_SESSION, client
from sandbox.sandbox import wait_for_removals
from sandbox.snapshots import SnapshotStore
from tests.adversarial.conftest import Attacker, peak_memory, reset_peak_memory

MB = 1024 * 1024
HOST_MEMORY_SLACK = 200 * MB  # what one flood may add to the harness's peak memory (it keeps ~128 KiB of it)
HANG = 30  # seconds past a limit that only a hang would need: bounds on time catch hangs, never speed


PROCESSES = """python3 - <<'EOF'
import json, os
def parent(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
mine, pid = set(), os.getpid()
while pid > 1:  # this probe and the exec's own shells
    mine.add(pid)
    pid = parent(pid)
found = []
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    try:
        uid = open(f"/proc/{pid}/status").read().split("Uid:")[1].split()[0]
        command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode().strip()
    except (OSError, IndexError):
        continue  # ended meanwhile
    if pid not in mine and uid != "0":  # root's are docker-init and its keep-alive
        found.append(command)
print("PROCESSES " + json.dumps(found))
EOF"""


def processes(attack: Attacker) -> list[str]:
    """Command lines of the agent's processes in the working container, other than the probe's own (the
    image has no ps)."""
    result = attack.bash(PROCESSES)
    line = next((line for line in result.text.splitlines() if line.startswith("PROCESSES ")), None)
    assert line, result.text
    return json.loads(line.removeprefix("PROCESSES "))


def assert_session_goes_on(attack: Attacker) -> None:
    """The next tool calls work, with no help from the test (no fresh_box)."""
    alive = attack.bash("echo alive")
    assert not alive.is_error and alive.text.startswith("alive\n"), alive.text
    assert not attack.edit("view", "trainer/train.py", view_range=[1, 3]).is_error


# -- bombs ---------------------------------------------------------------------------------------------
def test_fork_bomb_is_refused_at_the_process_limit_and_the_session_goes_on(attack):
    box = attack.box.name
    result = attack.bash("bomb() { bomb | bomb & }; bomb; sleep 10", timeout=5)
    assert result.is_error
    assert f"the process limit of {attack.box.policy.pids_limit} was reached" in result.text, result.text
    if attack.runtime == "runc":
        # The bomb's forks fail, the host clock ends the exec, every process of the agent is killed.
        assert "killed after 5 s wall-clock timeout" in result.text
        assert attack.box.name == box
    else:
        # Under gVisor the limit binds the sandbox's own kernel, which stops: the tool replaces the box.
        assert "restored to the session's base" in result.text
        assert attack.box.name != box
    assert_session_goes_on(attack)
    assert not any("bomb" in command or "sleep 10" in command for command in processes(attack))


def test_memory_bomb_in_bash_is_reported_as_out_of_memory(attack):
    box = attack.box.name
    result = attack.bash("python3 -c 'x = bytearray(2 << 30); print(\"allocated\")'", timeout=60)
    assert result.is_error and "out of memory" in result.text and "allocated" not in result.text, result.text
    if attack.runtime == "runc":
        assert attack.box.name == box  # only the offending process died
    else:
        # gVisor: the host's OOM killer picks one of the sandbox's own processes. If it was the sandbox's
        # kernel, the container is gone and the tool replaced it; if another (its gofer), the container goes
        # on and the exec was ended at once, not left waiting for the wall clock (see the train.py case).
        replaced = attack.box.name != box
        assert replaced == ("restored to the session's base" in result.text), result.text
    assert_session_goes_on(attack)


def test_memory_bomb_in_train_py_is_a_crash_with_out_of_memory(attack):
    attack.patch_train('    train_file = args.data / "train.bin"\n',
                       '    _hog = bytearray(2 << 30)\n    print("allocated", len(_hog))\n'
                       '    train_file = args.data / "train.bin"\n')
    experiment = attack.run_experiment("allocate 2 GB")
    # Under gVisor, with torch loaded, the host kills gVisor's gofer rather than its kernel and the allocating
    # process then waits forever: without the sandbox's check of the OOM counter this was a 22 s "timeout".
    assert experiment.status == "crash" and experiment.metric is None, experiment.log_tail
    assert "out of memory at the 1 GB limit" in experiment.log_tail, experiment.log_tail
    assert "allocated" not in experiment.log_tail
    assert_session_goes_on(attack)


# -- disk ----------------------------------------------------------------------------------------------
def test_disk_fill_in_bash_is_stopped_and_never_reaches_the_snapshot_store(attack):
    limit = attack.box.policy.disk_bytes
    result = attack.bash("head -c 400000000 /dev/zero > /workspace/fill; echo written", timeout=60)
    assert result.is_error and f"exceed the disk limit of {limit} bytes" in result.text, result.text
    # The agent ignores the message and asks for an experiment: the over-limit layer is not committed.
    lab = attack.session.lab_id
    before = {s.name for s in SnapshotStore().list(lab=lab)}  # this lab's only: other labs share the engine
    experiment = attack.run_experiment("snapshot a full disk")
    assert experiment.status == "crash" and "over its disk limit" in experiment.log_tail, experiment.log_tail
    assert experiment.snapshot is None
    assert {s.name for s in SnapshotStore().list(lab=lab)} == before
    # The workspace is the base again, the fill is gone, and the session goes on.
    gone = attack.bash("ls /workspace/fill")
    assert gone.is_error and "No such file" in gone.text
    assert_session_goes_on(attack)


def test_disk_fill_in_train_py_is_a_crash_with_the_disk_limit(attack):
    attack.patch_train('    train_file = args.data / "train.bin"\n',
                       '    with open("/workspace/junk", "wb") as _junk:\n'
                       '        for _ in range(400):\n'
                       '            _junk.write(bytes(1 << 20))\n'
                       '    print("junk written", flush=True)\n'
                       '    time.sleep(3600)\n'
                       '    train_file = args.data / "train.bin"\n')
    experiment = attack.run_experiment("write 400 MB")
    assert experiment.status == "crash" and experiment.metric is None, experiment.log_tail
    assert "training wrote past the disk limit" in experiment.log_tail, experiment.log_tail
    assert experiment.train_seconds < attack.session.config.time_budget
    gone = attack.bash("ls /workspace/junk")
    assert gone.is_error and "No such file" in gone.text  # the training container's files stay there


# -- floods and endless work ---------------------------------------------------------------------------
def test_a_gigabyte_output_flood_is_clipped_in_bounded_time_and_memory(attack):
    rss = reset_peak_memory()
    started = time.monotonic()
    # 2 GB: on an idle machine runc passes it in ~6 s; gVisor's slower pipes reach the timeout first.
    result = attack.bash("yes | head -c 2000000000", timeout=8)
    elapsed = time.monotonic() - started
    grown = peak_memory() - rss
    assert elapsed < 8 + HANG
    assert len(result.text) <= MODEL_OUTPUT_CHARS + 200, len(result.text)
    assert "characters cut" in result.text and result.text.startswith("y\ny\ny\n")
    assert "[exit code 0," in result.text or "killed after 8 s wall-clock timeout" in result.text, result.text[-300:]
    assert grown < HOST_MEMORY_SLACK, f"the harness grew by {grown / MB:.0f} MB"
    # What the ledger keeps of the call is the clipped result too.
    row = attack.session.ledger.db.execute("SELECT output FROM tool_calls ORDER BY id DESC LIMIT 1").fetchone()
    assert len(row["output"]) <= MODEL_OUTPUT_CHARS + 200
    assert_session_goes_on(attack)


def test_an_endless_loop_is_killed_at_the_timeout(attack):
    started = time.monotonic()
    result = attack.bash("while :; do :; done", timeout=3)
    assert time.monotonic() - started < 3 + HANG
    assert result.is_error and "killed after 3 s wall-clock timeout" in result.text, result.text
    assert processes(attack) == []  # nothing of the loop keeps burning a core


def test_flood_then_sleep_in_train_py_is_killed_by_the_host_clock(attack):
    config = attack.session.config
    attack.patch_train('    train_file = args.data / "train.bin"\n',
                       '    for _ in range(300):  # 300 MB of output, then sleep for hours\n'
                       '        sys.stdout.write(("flood " * 174 + "\\n") * 1000)\n'
                       '    sys.stdout.flush()\n'
                       '    time.sleep(10000)\n'
                       '    train_file = args.data / "train.bin"\n')
    rss = reset_peak_memory()
    experiment = attack.run_experiment("flood the log, then sleep")
    grown = peak_memory() - rss
    assert experiment.status == "timeout" and "all-in, host clock" in experiment.log_tail, experiment.log_tail
    limit = config.time_budget
    assert limit <= experiment.train_seconds < limit + HANG  # the host's clock, not the agent's
    reason_line = experiment.log_tail.splitlines()[0]
    assert len(experiment.log_tail) <= len(reason_line) + 1 + LOG_TAIL_CHARS
    assert "flood flood" in experiment.log_tail
    assert grown < HOST_MEMORY_SLACK, f"the harness grew by {grown / MB:.0f} MB"
    assert_session_goes_on(attack)


# -- processes that try to outlive their exec or their experiment ----------------------------------------
LEFTOVERS = r"""
nohup sleep 1001 >/dev/null 2>&1 &
setsid sleep 1002 </dev/null >/dev/null 2>&1 &
( (sleep 1003 </dev/null >/dev/null 2>&1 &) & )
sleep 1004 &
disown -a
setsid bash -c 'while :; do date +%s%N >> /workspace/beat; sleep 0.05; done' </dev/null >/dev/null 2>&1 &
python3 - <<'EOF'
import os, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
for fd in range(3):
    os.close(fd)
while True:
    with open("/home/agent/beat2", "a") as beat:
        beat.write("x")
    time.sleep(0.05)
EOF
sleep 1
"""


def test_background_processes_do_not_outlive_the_exec(attack):
    started = time.monotonic()
    launched = attack.bash(LEFTOVERS + PROCESSES, timeout=60)
    assert time.monotonic() - started < 60 and "killed after" not in launched.text, launched.text
    # Positive control: at the end of that exec, all of them were running.
    running = json.loads(next(line for line in launched.text.splitlines() if line.startswith("PROCESSES "))[10:])
    assert {f"sleep {n}" for n in (1001, 1002, 1003, 1004)} <= set(running), running
    assert any(c.startswith("bash -c while") for c in running) and "python3 -" in running, running
    left = processes(attack)
    assert not any("sleep 100" in c or "beat" in c or "python3" in c for c in left), left
    sizes = attack.bash("stat -c %s /workspace/beat /home/agent/beat2; sleep 1; stat -c %s /workspace/beat "
                        "/home/agent/beat2").text.split()[:4]
    assert sizes[:2] == sizes[2:], sizes  # nothing writes the files any more


TRAIN_DAEMON = """    if os.fork() == 0:  # a daemon: double fork, new session, writes (its stdout included) forever
        os.setsid()
        if os.fork() == 0:
            while True:
                print("DAEMON-BEAT", time.time(), flush=True)
                for _beat in ("/workspace/train-beat", "/home/agent/train-beat"):
                    with open(_beat, "a") as _fh:
                        _fh.write("x")
                time.sleep(0.05)
        os._exit(0)
    os.wait()
    train_file = args.data / "train.bin"
"""


def test_daemons_do_not_outlive_the_experiment_and_snapshots_stay_bounded(attack):
    session = attack.session
    working = attack.box.name
    # A writer in the working container (the exec reaps it) and 64 MB of ballast, under the disk limit.
    started = attack.bash("setsid bash -c 'while :; do echo x >> /workspace/beat; sleep 0.05; done' "
                          "</dev/null >/dev/null 2>&1 & head -c 64000000 /dev/zero > /workspace/ballast; sleep 0.5")
    assert not started.is_error, started.text
    attack.patch_train('    train_file = args.data / "train.bin"\n', TRAIN_DAEMON)
    experiment = attack.run_experiment("train with a daemon alongside")
    # Training ended with train.py, and the evaluation ran in a container of its own: a metric.
    assert experiment.status in ("keep", "discard") and experiment.metric is not None, experiment.log_tail
    assert "DAEMON-BEAT" in experiment.log_tail  # the daemon did run during training
    # A fresh working container: no writer, no daemon, none of the training container's files.
    assert attack.box.name != working
    left = processes(attack)
    assert not any("beat" in c or "python" in c for c in left), left
    files = attack.bash("ls /workspace/train-beat /home/agent/train-beat 2>&1").text
    assert "'/workspace/train-beat': No such file" in files and "'/home/agent/train-beat': No such file" in files
    if experiment.status == "keep":  # the box holds the candidate, with its beat file: frozen
        sizes = attack.bash("stat -c %s /workspace/beat; sleep 1; stat -c %s /workspace/beat").text.split()[:2]
        assert sizes[0].isdigit() and sizes[0] == sizes[1], sizes
    # No container of the training outlives the experiment.
    wait_for_removals()
    trainers = client().api.containers(all=True, filters={"label": [f"{LABEL_SESSION}={session.session_id}",
                                                                    f"{LABEL_ROLE}=train"]})
    assert [c["Names"] for c in trainers] == []
    # Each snapshot adds at most the disk limit to the store (its size less its parent's); this one holds
    # the ballast, so the measure does see what the agent wrote.
    limit = attack.box.policy.disk_bytes
    grown = {}
    for snap in SnapshotStore().list(lab=session.lab_id):
        image = client().images.get(snap.image_id)
        grown[snap.name] = image.attrs["Size"] - client().images.get(image.attrs["Parent"]).attrs["Size"]
    assert grown and all(size <= limit for size in grown.values()), grown
    assert grown[experiment.snapshot] >= 64_000_000, grown
    assert json.loads(experiment.timings_json)["train"] < session.config.time_budget + HANG
