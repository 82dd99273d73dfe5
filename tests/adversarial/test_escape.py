"""Escape and reach: an agent that wants out of its container, through the tools it has (bash, the file
editor, run_experiment). Each attack asserts the concrete blocked outcome, and where the attack could
work at all a positive control shows the target exists (the host service answers on the host, a setuid
binary does run as root once no-new-privileges is off)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import tempfile
from pathlib import Path

from sandbox.engine import client
from sandbox.policy import SandboxPolicy
from sandbox.sandbox import Sandbox
from tests.adversarial.conftest import Attacker
from tests.conftest import SESSION
from tests.test_hardening import _bridge_gateway, host_server  # noqa: F401  (a fixture, used by name)

MARK = "PROBE-RESULT "


def probe(attack: Attacker, script: str, timeout: int = 120) -> dict:
    """Run a Python script through the bash tool (as the agent would) and return the JSON it printed."""
    result = attack.bash(f"python3 - <<'LABRAT_PROBE'\n{script}\nLABRAT_PROBE", timeout=timeout)
    lines = [line for line in result.text.splitlines() if line.startswith(MARK)]
    assert lines, result.text
    return json.loads(lines[-1][len(MARK):])


PRELUDE = f"""
import ctypes, errno, json, os, socket, subprocess
out = {{}}
def done():
    print({MARK!r} + json.dumps(out))
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def sh(cmd, timeout=60):
    run = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    return {{"rc": run.returncode, "out": run.stdout[-2000:], "err": run.stderr[-2000:]}}
"""


def test_no_tcp_to_the_host_and_no_dns(attack, host_server):
    port, hits = host_server
    gateway = _bridge_gateway()
    # Positive control: the service answers on the host, on loopback and on the docker bridge's gateway.
    for address in ("127.0.0.1", gateway):
        with socket.create_connection((address, port), timeout=5) as conn:
            assert conn.recv(100) == b"host-secret\n"
    hits.clear()
    out = probe(attack, PRELUDE + f"""
def connect(host):
    with socket.create_connection((host, {port}), timeout=3) as conn:
        out[host + " data"] = conn.recv(100).decode()
for host in ("127.0.0.1", "{gateway}", "1.1.1.1"):
    out[host] = attempt(lambda: connect(host))
try:
    socket.getaddrinfo("pypi.org", 443)
    out["dns"] = "resolved"
except socket.gaierror as exc:
    out["dns"] = "failed"
out["interfaces"] = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
out["curl"] = sh("curl -sS -m 3 http://{gateway}:{port}/ 2>&1 || wget -q -T 3 -O- http://{gateway}:{port}/ 2>&1")["out"]
done()
""")
    assert out["dns"] == "failed"
    assert out["interfaces"] == ["lo"]  # --network none: nothing but the container's own loopback
    # 127.0.0.1 is the container's loopback (nothing listens there); the others have no route at all.
    assert out["127.0.0.1"] == "ECONNREFUSED"
    assert out[gateway] in ("ENETUNREACH", "EHOSTUNREACH")
    assert out["1.1.1.1"] in ("ENETUNREACH", "EHOSTUNREACH")
    assert not any(key.endswith(" data") for key in out)
    assert "host-secret" not in out["curl"]
    assert hits == []  # the host service never saw a connection


def test_raw_and_packet_sockets_are_refused(attack):
    out = probe(attack, PRELUDE + """
out["raw_icmp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
out["raw_tcp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
out["packet"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)))
out["ping"] = sh("ping -c1 -W1 127.0.0.1 2>&1")["rc"]
done()
""")
    # CAP_NET_RAW is dropped (Docker's default set would allow raw sockets).
    assert out["raw_icmp"] == out["raw_tcp"] == out["packet"] == "EPERM", out
    assert out["ping"] != 0


def test_no_docker_socket_anywhere_and_no_host_files(attack, tmp_path):
    marker = f"labrat-host-marker-{secrets.token_hex(6)}"
    # Markers on the host: next to the training data the container mounts, in the lab, in the system tmp.
    places = [attack.run.data.train_dir.parent, attack.session.lab, Path(tempfile.gettempdir()), tmp_path]
    written = []
    for place in places:
        path = place / marker
        path.write_text("host only\n")
        written.append(path)
    try:
        assert all(path.read_text() == "host only\n" for path in written)  # positive control: they exist
        out = probe(attack, PRELUDE + f"""
found = sh("find / \\\\( -path /proc -o -path /sys \\\\) -prune -o \\\\( -name docker.sock -o -name '{marker}' "
           "-o -name 'containerd.sock' -o -name train.bin \\\\) -print 2>/dev/null", timeout=300)
out["found"] = sorted(found["out"].split())
out["docker_sock"] = attempt(lambda: socket.socket(socket.AF_UNIX).connect("/var/run/docker.sock"))
out["docker_env"] = sorted(k for k in os.environ if k.startswith("DOCKER"))
out["proc1_root"] = attempt(lambda: os.listdir("/proc/1/root/"))
mounts = []
for line in open("/proc/self/mountinfo"):
    left, _, right = line.partition(" - ")
    fields, fstype = left.split(), right.split()[0]
    mounts.append([fields[4], fields[3], fields[5], fstype])
out["mounts"] = mounts
done()
""")
    finally:
        for path in written:
            path.unlink()
    # The filesystem walk did reach the bind mount (train.bin at /data), and found no socket and no marker.
    assert out["found"] == ["/data/train.bin"], out["found"]
    assert out["docker_sock"] == "ENOENT" and out["docker_env"] == []
    assert out["proc1_root"] == "EACCES"  # PID 1 is root's: its root directory is not a way out
    # Host filesystems reach the container only as: the read-only /data, docker's read-only init binary,
    # and docker's per-container hosts/hostname/resolv.conf files (root-owned, see the write test).
    host_fs = {"ext4", "ext3", "ext2", "xfs", "btrfs", "zfs", "9p", "vfat", "fuse"}
    binds = {point: options for point, _root, options, fstype in out["mounts"] if fstype in host_fs and point != "/"}
    assert set(binds) <= {"/data", "/usr/sbin/docker-init", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}, binds
    assert binds["/data"].split(",")[0] == "ro" and binds["/usr/sbin/docker-init"].split(",")[0] == "ro"
    if attack.runtime == "runc":  # runc shows the host path of each bind; only the training split's is lab data
        roots = {point: root for point, root, _options, fstype in out["mounts"] if point in binds}
        assert roots["/data"] == str(attack.run.data.train_dir)


def test_the_training_data_mount_cannot_be_written(attack):
    train_bin = attack.run.data.train_dir / "train.bin"
    before = hashlib.sha256(train_bin.read_bytes()).hexdigest()
    out = probe(attack, PRELUDE + """
out["append"] = attempt(lambda: open("/data/train.bin", "ab").write(b"x"))
out["create"] = attempt(lambda: open("/data/planted.bin", "wb").write(b"x"))
out["unlink"] = attempt(lambda: os.unlink("/data/train.bin"))
out["rename"] = attempt(lambda: os.rename("/data/meta.json", "/data/meta2.json"))
out["chmod"] = attempt(lambda: os.chmod("/data/train.bin", 0o666))
out["utime"] = attempt(lambda: os.utime("/data/train.bin", (0, 0)))
out["remount"] = sh("mount -o remount,rw /data 2>&1")["rc"]
done()
""")
    assert hashlib.sha256(train_bin.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in train_bin.parent.iterdir()) == ["meta.json", "train.bin"]
    assert out["remount"] != 0
    if attack.runtime == "runc":
        # The kernel answers for the read-only mount before file permissions: EROFS is the mount's doing.
        assert out["create"] == out["unlink"] == out["rename"] == "EROFS", out
        assert out["append"] in ("EROFS", "EACCES") and out["chmod"] in ("EROFS", "EPERM"), out
    else:  # gVisor's gofer refuses before the mount flag is consulted; nothing is written either way
        attempts = ("append", "create", "unlink", "rename", "chmod")
        assert all(out[k] in ("EROFS", "EACCES", "EPERM") for k in attempts), out


def test_setuid_binaries_give_no_root(attack, image):
    script = PRELUDE + """
setuid = sh("find / \\\\( -path /proc -o -path /sys \\\\) -prune -o -type f -perm -4000 -print 2>/dev/null", 300)
out["setuid"] = sorted(setuid["out"].split())
out["sudo"] = sh("command -v sudo doas pkexec")["out"].split()
out["su"] = sh("su -c id root < /dev/null 2>&1")
# A setuid-root binary, caught in the act: su waits for a password; its effective uid is read from /proc.
import time
proc = subprocess.Popen(["su", "-c", "id"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
for _ in range(200):  # until the child has exec'd su (its name changes), then a moment for it to settle
    if open(f"/proc/{proc.pid}/status").readline().split()[1] == "su":
        break
    time.sleep(0.05)
time.sleep(0.3)
out["su_uid"] = [line.split()[1:] for line in open(f"/proc/{proc.pid}/status") if line.startswith("Uid:")][0]
proc.kill()
out["setuid0"] = attempt(lambda: os.setuid(0))
out["nonewprivs"] = [line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs")]
done()
"""
    out = probe(attack, script)
    assert out["setuid"], "the image has setuid-root binaries (su, mount, passwd...): the probe below is real"
    assert out["sudo"] == []
    assert out["su"]["rc"] != 0 and "uid=0" not in out["su"]["out"]
    assert out["setuid0"] == "EPERM"
    assert out["su_uid"] == ["1000", "1000", "1000", "1000"], out["su_uid"]  # real, effective, saved, fs
    if attack.runtime == "runc":
        assert out["nonewprivs"] == ["1"]
    # Positive control: the same probe in a container without no-new-privileges. Under runc the setuid bit
    # then works (effective uid 0): no-new-privileges is what stops it. gVisor ignores the bit either way.
    loose = SandboxPolicy(image=image, runtime=attack.runtime, no_new_privileges=False)
    with Sandbox.start(loose, session=SESSION) as box:
        run = box.exec(f"python3 - <<'LABRAT_PROBE'\n{script}\nLABRAT_PROBE")
    control = json.loads(run.stdout.split(MARK)[-1])
    assert control["su_uid"] == (["1000", "0", "0", "0"] if attack.runtime == "runc" else ["1000"] * 4)


def test_no_capabilities_no_mount_no_user_namespaces(attack):
    out = probe(attack, PRELUDE + """
caps = {line.split(":")[0]: int(line.split()[1], 16) for line in open("/proc/self/status") if line.startswith("Cap")}
out["caps"] = caps
out["mount"] = sh("mount -t tmpfs none /mnt 2>&1; mount -o remount,rw / 2>&1")
out["mounted"] = sh("grep -c ' /mnt ' /proc/self/mounts")["out"].strip()
libc = ctypes.CDLL(None, use_errno=True)
def unshare(flags):
    if libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
out["unshare_ns"] = attempt(lambda: unshare(0x00020000 | 0x04000000))  # CLONE_NEWNS | CLONE_NEWNET, no userns
out["unshare_cli"] = sh("unshare -Ur id 2>&1")
# What a user namespace would buy, if one can be had: root-owned paths and the read-only data stay closed.
out["in_userns"] = sh("unshare -Urm sh -c 'id -u; touch /etc/evil; touch /data/evil; cat /root/.bashrc; "
                      "ls /proc/1/root/; echo done' 2>&1")
open("/workspace/capfile", "w").close()
out["setfcap"] = attempt(lambda: os.setxattr("/workspace/capfile", "security.capability",
                                             bytes.fromhex("0100000200200000000000000000000000000000")))
out["setcap_bin"] = sh("command -v setcap capsh")["out"].split()
done()
""")
    caps = out["caps"]
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == caps["CapInh"] == 0, caps
    assert caps.get("CapAmb", 0) == 0
    assert out["mount"]["rc"] != 0 and out["mounted"] == "0"
    assert out["unshare_ns"] == "EPERM"
    # No CAP_SETFCAP: a file capability cannot even be written (and the bounding set is empty anyway);
    # gVisor has no security.* extended attributes at all.
    assert out["setfcap"] == ("EPERM" if attack.runtime == "runc" else "ENOTSUP"), out["setfcap"]
    assert out["setcap_bin"] == []
    userns = out["in_userns"]["out"]
    if attack.runtime == "runc":
        # Docker's seccomp profile refuses unshare(CLONE_NEWUSER) without CAP_SYS_ADMIN.
        assert out["unshare_cli"]["rc"] != 0 and "Operation not permitted" in out["unshare_cli"]["out"]
        assert userns.startswith("unshare: unshare failed: Operation not permitted") and "done" not in userns
    else:
        # gVisor does not apply the OCI seccomp profile by default (runsc --oci-seccomp would): a user
        # namespace can be made, but it lives in gVisor's own kernel and its "root" owns nothing: root-owned
        # files, the read-only data and PID 1 stay closed.
        assert out["unshare_cli"]["rc"] == 0 and "uid=0" in out["unshare_cli"]["out"]
        assert userns.startswith("0\n") and userns.rstrip().endswith("done"), userns
        assert "'/etc/evil': Permission denied" in userns and "'/data/evil': Permission denied" in userns
        assert "/root/.bashrc: Permission denied" in userns and "/proc/1/root/': Permission denied" in userns


def test_writes_outside_workspace_home_and_tmp_are_refused(attack):
    out = probe(attack, PRELUDE + """
import glob, sysconfig
site = sysconfig.get_paths()["purelib"]
targets = ["/evil", "/etc/evil", "/etc/hosts", "/etc/passwd", "/usr/bin/evil",
           "/usr/lib/python3/dist-packages/evil.pth",
           site + "/sitecustomize.py", site + "/evil.pth", "/opt/venv/bin/python3", "/root/evil", "/var/evil",
           "/workspace/trainer/evil.py", "/workspace/trainer/evaluate.py", "/workspace/trainer/prepare.py",
           "/usr/sbin/docker-init", "/etc/resolv.conf"]
out["writes"] = {t: attempt(lambda t=t: open(t, "a").write("x")) for t in targets}
out["allowed"] = {t: attempt(lambda t=t: open(t, "w").write("x")) for t in
                  ["/workspace/ok", "/home/agent/ok", "/tmp/ok"]}
found = sh("find / -xdev -type d -writable 2>/dev/null | grep -v '^/proc' | sort", 300)["out"].split()
out["writable_roots"] = sorted({p for p in found if not any(p.startswith(q + "/") for q in found)})
done()
""")
    refused = {target: why for target, why in out["writes"].items() if why != "ok"}
    assert refused == out["writes"], {t: w for t, w in out["writes"].items() if w == "ok"}
    assert set(refused.values()) <= {"EACCES", "EROFS", "EPERM", "ETXTBSY"}
    assert out["allowed"] == {"/workspace/ok": "ok", "/home/agent/ok": "ok", "/tmp/ok": "ok"}
    assert set(out["writable_roots"]) <= {"/workspace", "/home/agent", "/tmp", "/dev/shm", "/dev/mqueue"}
    assert {"/workspace", "/home/agent"} <= set(out["writable_roots"])


def test_other_processes_and_the_harness_are_out_of_sight(attack, image):
    host_pid = os.getpid()
    host_cmdline = Path(f"/proc/{host_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    # The harness's environment, less what the image sets too (PYTHONUNBUFFERED=1 may be in both) and what
    # any shell sets for itself.
    image_env = set(client().images.get(image).attrs["Config"]["Env"])
    shell_keys = {"HOME", "PATH", "HOSTNAME", "TERM", "LANG", "SHLVL", "_", "PWD", "OLDPWD", "LC_ALL", "LC_CTYPE"}
    host_environ = [e for e in Path(f"/proc/{host_pid}/environ").read_bytes().decode(errors="replace").split("\0")
                    if "=" in e and e.split("=", 1)[0] not in shell_keys and e not in image_env]
    assert host_cmdline and host_environ  # positive control: on the host both are there to read
    out = probe(attack, PRELUDE + f"""
procs = {{}}
for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
    entry = {{}}
    for name in ("cmdline", "environ"):
        try:
            entry[name] = open(f"/proc/{{pid}}/{{name}}", "rb").read().decode(errors="replace")
        except OSError as exc:
            entry[name] = "!" + errno.errorcode.get(exc.errno, "?")
    entry["uid"] = [line.split()[1] for line in open(f"/proc/{{pid}}/status") if line.startswith("Uid:")][0]
    procs[pid] = entry
out["procs"] = procs
out["self"] = os.getpid()
out["host_pid_exists"] = os.path.exists("/proc/{host_pid}")
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
def ptrace_attach(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), "ptrace")
out["ptrace_pid1"] = attempt(lambda: ptrace_attach(1))
out["mem_pid1"] = attempt(lambda: open("/proc/1/mem", "rb").read(1))
out["kill_pid1"] = attempt(lambda: os.kill(1, 9))
out["gdb"] = sh("command -v gdb strace")["out"].split()
done()
""")
    procs = {int(pid): entry for pid, entry in out["procs"].items()}
    # A PID namespace of its own: a handful of processes, none of them the harness (or anything of the host).
    assert len(procs) < 12, procs
    commands = [entry["cmdline"].replace("\0", " ").strip() for entry in procs.values()]
    assert host_cmdline not in commands and not any("pytest" in c or "/work/" in c for c in commands), commands
    if out["host_pid_exists"]:  # the number may exist in the container's own PID space: then it is not us
        assert procs[host_pid]["cmdline"].replace("\0", " ").strip() != host_cmdline
    # The harness's environment is in no process's environ the agent can read.
    readable = {v for e in procs.values() if not e["environ"].startswith("!") for v in e["environ"].split("\0")}
    leaked = [e for e in host_environ if e in readable]
    assert leaked == []
    # PID 1 (docker-init, root): its environ is unreadable under runc; gVisor lets the agent read it, and it
    # holds only the image's environment.
    pid1 = procs[1]
    assert pid1["uid"] == "0" and "docker-init" in pid1["cmdline"]
    if attack.runtime == "runc":
        assert pid1["environ"] == "!EACCES"
    else:
        keys = {e.split("=", 1)[0] for e in pid1["environ"].split("\0") if e}
        image_keys = {e.split("=", 1)[0] for e in image_env} | {"HOSTNAME"}
        assert keys <= image_keys and "PATH" in keys, keys
    assert out["ptrace_pid1"] == "EPERM"
    assert out["mem_pid1"] == "EACCES"
    assert out["kill_pid1"] == "EPERM"
    assert attack.bash("echo still-here").text.startswith("still-here")


def test_train_py_has_the_same_confinement_and_the_experiment_records_normally(attack, host_server):
    port, hits = host_server
    gateway = _bridge_gateway()
    with socket.create_connection((gateway, port), timeout=5) as conn:  # positive control, from the host
        assert conn.recv(100) == b"host-secret\n"  # (answered: the server has counted it before clear())
    hits.clear()
    train_bin = attack.run.data.train_dir / "train.bin"
    before = hashlib.sha256(train_bin.read_bytes()).hexdigest()
    attack.patch_train("    train_file = args.data / \"train.bin\"\n", f"""    import errno as _errno, socket as _socket
    _escape = {{}}
    def _try(name, fn):
        try:
            fn()
            _escape[name] = "ok"
        except OSError as exc:
            _escape[name] = _errno.errorcode.get(exc.errno, str(exc.errno))
    for _host in ("127.0.0.1", "{gateway}"):
        _try(_host, lambda: _socket.create_connection((_host, {port}), timeout=3).close())
    _try("data_append", lambda: open(args.data / "train.bin", "ab").write(b"x" * 1000))
    _try("data_create", lambda: open(args.data / "planted.bin", "wb").write(b"x"))
    _try("docker_sock", lambda: _socket.socket(_socket.AF_UNIX).connect("/var/run/docker.sock"))
    _try("raw", lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_RAW, _socket.IPPROTO_ICMP))
    _try("etc", lambda: open("/etc/evil", "w"))
    _escape["uid"] = os.getuid()
    _escape["capeff"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
    print("ESCAPE-PROBE " + json.dumps(_escape), flush=True)
    train_file = args.data / "train.bin"
""")
    experiment = attack.run_experiment("baseline, plus a look around from inside training")
    assert experiment.status in ("keep", "discard") and experiment.metric is not None, experiment.log_tail
    line = next(line for line in experiment.log_tail.splitlines() if line.startswith("ESCAPE-PROBE "))
    seen = json.loads(line.removeprefix("ESCAPE-PROBE "))
    assert seen["127.0.0.1"] == "ECONNREFUSED" and seen[gateway] in ("ENETUNREACH", "EHOSTUNREACH"), seen
    assert seen["docker_sock"] == "ENOENT" and seen["raw"] == "EPERM", seen
    assert seen["data_append"] in ("EROFS", "EACCES") and seen["data_create"] in ("EROFS", "EACCES"), seen
    assert seen["etc"] == "EACCES" and seen["uid"] == 1000 and int(seen["capeff"], 16) == 0, seen
    assert hits == []
    assert hashlib.sha256(train_bin.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in train_bin.parent.iterdir()) == ["meta.json", "train.bin"]
