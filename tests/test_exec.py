"""exec on the real engine, under runc and gVisor: exit codes, streams, timeouts, floods, binary output."""

import time

import pytest

from sandbox.errors import SandboxClosed


def test_exit_code_and_separate_streams(box):
    result = box.exec("echo out; echo err >&2; exit 7")
    assert result.exit_code == 7
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert not result.timed_out and result.limit is None and not result.ok


def test_runs_as_the_agent_user_in_the_workspace(box):
    result = box.exec("id -u; id -un; pwd")
    assert result.stdout.split() == ["1000", "agent", "/workspace"]


def test_argv_form_is_not_shell_interpreted(box):
    result = box.exec(["echo", "$HOME; rm -rf /"])
    assert result.stdout == "$HOME; rm -rf /\n"


def test_stdin_input(box):
    result = box.exec("wc -c", input=b"x" * 100_000)
    assert result.stdout.strip() == "100000"


def test_timeout_kills_the_command_and_its_background_children(box):
    # Three ways to outlive a shell: a background job, a new session (setsid), a double fork.
    script = "sleep 1000 & setsid sleep 1001 & (sleep 1002 &) ; echo started; sleep 1003"
    started = time.monotonic()
    result = box.exec(script, timeout=2)
    assert result.timed_out and result.limit == "timeout"
    assert "started" in result.stdout
    assert "wall-clock timeout" in result.stderr
    assert time.monotonic() - started < 30
    survivors = box.exec("grep -l '^sleep.100[0-3]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")
    assert survivors.stdout.strip() == "0"
    assert box.exec("echo still usable").stdout == "still usable\n"


def test_background_processes_do_not_outlive_a_normal_exec(box):
    result = box.exec("setsid sleep 1000 & nohup sleep 1001 >/dev/null 2>&1 & echo launched")
    assert result.exit_code == 0 and result.stdout == "launched\n"
    survivors = box.exec("grep -l '^sleep.100[01]' /proc/[0-9]*/cmdline 2>/dev/null | wc -l")
    assert survivors.stdout.strip() == "0"


def test_output_flood_is_truncated_with_a_marker(box):
    # 200 MB on stdout; the host keeps the head and tail only.
    result = box.exec("head -c 200000000 /dev/zero | tr '\\0' 'a'; echo; echo THE-END", max_output=4096, timeout=120)
    assert result.exit_code == 0
    assert result.truncated
    assert len(result.stdout) < 4096 + 200
    assert result.stdout.startswith("aaaa")
    assert result.stdout.rstrip().endswith("THE-END")
    assert "bytes truncated" in result.stdout


def test_binary_output_is_decoded_safely(box):
    result = box.exec("printf 'ok\\000\\001\\033[31m\\377\\376 tail'")
    assert result.exit_code == 0
    assert result.stdout.startswith("ok")
    assert result.stdout.endswith(" tail")
    assert "\x00" not in result.stdout and "\x1b" not in result.stdout
    assert "\ufffd" in result.stdout


def test_exec_after_close_is_refused(policy):
    from sandbox.sandbox import Sandbox
    from tests.conftest import SESSION

    sandbox = Sandbox.start(policy, session=SESSION)
    sandbox.close()
    with pytest.raises(SandboxClosed):
        sandbox.exec("true")
    sandbox.close()  # twice is fine


def test_exec_in_a_container_removed_behind_our_back(policy):
    from sandbox.sandbox import Sandbox
    from tests.conftest import SESSION

    with Sandbox.start(policy, session=SESSION) as sandbox:
        sandbox.container.remove(force=True)
        with pytest.raises(SandboxClosed, match="gone|not running"):
            sandbox.exec("true")
