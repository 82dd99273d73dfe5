"""Each defence of the container, attacked for real from inside it."""

import socket
import threading
import time

import pytest

from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.conftest import SESSION


@pytest.fixture
def host_server():
    """A TCP service on the host, listening on every interface (loopback and the docker bridge)."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen()
    hits = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            hits.append(conn)
            conn.sendall(b"host-secret\n")
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], hits
    server.close()


def _bridge_gateway() -> str:
    from sandbox.engine import client

    network = client().networks.get("bridge")
    return network.attrs["IPAM"]["Config"][0].get("Gateway", "172.17.0.1")


def test_no_network_no_dns_no_host_services(box, host_server):
    port, hits = host_server
    # The host service really is reachable from the host, so a failure inside means isolation.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        assert conn.recv(100) == b"host-secret\n"
    hits.clear()
    probe = f"""
import socket
out = []
for host in ("127.0.0.1", "{_bridge_gateway()}", "1.1.1.1"):
    try:
        socket.create_connection((host, {port}), timeout=3).recv(100)
        out.append(host + " reached")
    except OSError as exc:
        out.append(host + " blocked")
try:
    socket.getaddrinfo("pypi.org", 443)
    out.append("dns resolved")
except OSError:
    out.append("dns blocked")
print(";".join(out))
"""
    result = box.exec(["python", "-c", probe], timeout=60)
    assert result.stdout.strip().split(";") == [
        "127.0.0.1 blocked", f"{_bridge_gateway()} blocked", "1.1.1.1 blocked", "dns blocked"]
    assert hits == []
    interfaces = box.exec("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '").stdout.split()
    assert set(interfaces) <= {"lo"}


def test_no_docker_socket_and_no_host_mounts(box):
    result = box.exec("ls -la /var/run/docker.sock /run/docker.sock 2>&1; grep -c docker.sock /proc/mounts")
    assert "No such file" in result.stdout
    assert result.stdout.strip().endswith("0")


def test_non_root_without_capabilities(box):
    result = box.exec(
        "id -u; grep CapEff /proc/self/status | awk '{print $2}';"
        "touch /usr/evil /etc/evil /opt/venv/evil 2>&1 | wc -l;"
        "python -c 'import os\ntry:\n os.setuid(0); print(\"root\")\nexcept PermissionError: print(\"denied\")'"
    )
    uid, caps, failed_writes, setuid = result.stdout.split()
    assert uid == "1000"
    assert int(caps, 16) == 0
    assert failed_writes == "3"
    assert setuid == "denied"


def test_no_new_privileges_under_runc(runc_box):
    # gVisor does not report the flag in /proc; runc must.
    assert "NoNewPrivs:\t1" in runc_box.exec("cat /proc/self/status").stdout


def test_only_workspace_home_and_tmp_are_writable(box):
    # Every directory the agent's user can write: the snapshot (and flattening) must cover them all.
    found = box.exec("find / -xdev -type d -writable 2>/dev/null | grep -v '^/proc' | sort").stdout.split()
    roots = {path for path in found if not any(path.startswith(p + "/") for p in found)}
    assert roots <= {"/workspace", "/home/agent", "/tmp", "/dev/shm", "/dev/mqueue"}, roots
    assert "/workspace" in roots and "/home/agent" in roots


def test_fork_bomb_is_stopped_by_the_pids_limit(image, runtime):
    policy = SandboxPolicy(image=image, runtime=runtime, pids_limit=128)
    with Sandbox.start(policy, session=SESSION) as box:
        result = box.exec("bomb() { bomb | bomb & }; bomb; sleep 10", timeout=8)
        if runtime == "runsc":
            # Under gVisor the limit binds the sandbox's own kernel process, which stops: the host is untouched.
            assert result.limit == "died"
            return
        assert result.limit == "timeout"
        assert "Resource temporarily unavailable" in result.stderr
        assert box.exec("echo alive").stdout == "alive\n"
    with Sandbox.start(policy, session=SESSION) as fresh:
        assert fresh.exec("echo alive").stdout == "alive\n"


def test_memory_bomb_is_recorded_as_oom(image, runtime):
    policy = SandboxPolicy(image=image, runtime=runtime, memory_bytes=512 * 1024**2)
    with Sandbox.start(policy, session=SESSION) as box:
        result = box.exec(["python", "-c", "x = bytearray(2 << 30); print('allocated')"], timeout=60)
        assert result.oom_killed and result.limit == "memory"
        assert "allocated" not in result.stdout
        assert "out of memory" in result.stderr
        if runtime == "runc":
            assert box.exec("echo alive").stdout == "alive\n"  # only the offending process died


def test_disk_limit_is_enforced(image, runtime):
    policy = SandboxPolicy(image=image, runtime=runtime, disk_bytes=64 * 1024**2, disk_poll_seconds=0.2)
    with Sandbox.start(policy, session=SESSION) as box:
        # A steady writer is stopped while it runs...
        slow = box.exec("for i in $(seq 100); do head -c 8000000 /dev/zero > f$i; sleep 0.1; done; echo finished",
                        timeout=120)
        assert slow.limit == "disk" and "finished" not in slow.stdout
        written = len(box.list_dir("."))
        assert written < 100
        assert "disk limit" in slow.stderr
        # ...a burst that ends between two polls is reported by the exec itself once a check is due...
        box.exec("rm -f f*")
        time.sleep(policy.disk_poll_seconds)
        burst = box.exec("head -c 100000000 /dev/zero > burst")
        assert burst.limit == "disk"
        # ...and, if it was not due, by the next exec that runs after the poll interval.
        box.exec("rm -f burst")
        time.sleep(policy.disk_poll_seconds)
        box.exec("true")  # a check happens here (nothing over the limit)
        first = box.exec("head -c 100000000 /dev/zero > burst")  # within the interval: may go unchecked
        time.sleep(policy.disk_poll_seconds)
        assert first.limit == "disk" or box.exec("true").limit == "disk"
        # ...and /tmp, a tmpfs, has its own bound.
        box.exec("rm -f burst")
        tmp = box.exec("head -c 400000000 /dev/zero > /tmp/fill", timeout=60)
        assert tmp.exit_code != 0 and "No space left" in tmp.stderr
