"""A container's cgroup counters, read from the host: OOM kills, forks refused at the pids limit, peak memory.

The kernel keeps these counts outside the container, where nothing the agent runs can reset them. Each
reader answers 0 or None when the file is unreadable (another cgroup layout, or the container is gone).
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def _cgroup_files(container_id: str, v1_name: str, v2_name: str, controller: str = "memory") -> list[str]:
    """Where a container's cgroup file lives: cgroup v1 (cgroupfs or systemd driver), then v2."""
    return [
        f"/sys/fs/cgroup/{controller}/docker/{container_id}/{v1_name}",
        f"/sys/fs/cgroup/{controller}/system.slice/docker-{container_id}.scope/{v1_name}",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/{v2_name}",
        f"/sys/fs/cgroup/docker/{container_id}/{v2_name}",
    ]


def _counter(path: str | None, key: str) -> int | None:
    """The value of `key` in a cgroup file of "key value" lines (memory.events, pids.events); None if unreadable."""
    if path is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return None


def oom_kills(container_id: str) -> int:
    """The container cgroup's OOM-kill counter (cgroup v1 or v2); 0 if unreadable."""
    counts = (_counter(path, "oom_kill") for path in _cgroup_files(container_id, "memory.oom_control", "memory.events"))
    return next((count for count in counts if count is not None), 0)


def pids_events_file(container_id: str) -> str | None:
    """The container's pids.events, found once so that polling it costs one read."""
    paths = _cgroup_files(container_id, "pids.events", "pids.events", "pids")
    return next((path for path in paths if Path(path).exists()), None)


def refused_forks(pids_events: str | None) -> int:
    """Forks and clones refused at the pids limit (pids.events "max"); 0 if unreadable or gone."""
    return _counter(pids_events, "max") or 0


def peak_memory(container_id: str) -> int | None:
    """The container's peak memory use so far (None if unreadable)."""
    for path in _cgroup_files(container_id, "memory.max_usage_in_bytes", "memory.peak"):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(path).read_text().split()[0])
    return None
