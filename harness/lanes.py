"""What each lane (one agent at work, with its own working container and lineage) may use.

An experiment in flight never shares a GPU or a CPU core with another: with `gpus`, lane k trains and is
evaluated on the k-th listed GPU alone; without, the cores this process may run on are split into disjoint
sets, one a lane, and every container of the lane is pinned to its set (`cpuset`). One lane uses what the
config says, as before lanes existed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from harness.config import ConfigError, LabConfig


@dataclass(frozen=True)
class LaneResources:
    lane: int
    gpus: str | None  # the lane's GPU ("0"), or the config's with one lane
    cpuset: str | None  # the lane's host cores ("0,1"); None: any
    cpus: float | None  # the CPU time its containers may use (cores)

    def describe(self) -> str:
        return f"GPU {self.gpus}" if self.gpus else f"CPU {self.cpuset}" if self.cpuset else "the whole machine"


def host_gpus() -> list[str]:
    """The host's GPU indices, from nvidia-smi; [] without it."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def plan_lanes(config: LabConfig, cores: list[int] | None = None, gpus: list[str] | None = None) -> list[LaneResources]:
    """One LaneResources per lane, or a one-line ConfigError when the machine cannot give each its own.
    `cores` and `gpus`: the host's, found here when not given."""
    n = config.parallel
    if n == 1:
        return [LaneResources(0, config.gpus, None, config.cpus)]
    if config.gpus:
        ids = [g.strip() for g in config.gpus.split(",") if g.strip()] if config.gpus != "all" else (
            gpus if gpus is not None else host_gpus())
        if config.gpus == "all" and not ids:
            raise ConfigError(f"parallel = {n} with gpus = \"all\": nvidia-smi found no GPU to count; list them "
                              "(gpus = \"0,1\")")
        if len(ids) < n:
            raise ConfigError(f"parallel = {n} needs {n} GPUs, one a lane; gpus = {config.gpus!r} gives {len(ids)}")
        return [LaneResources(k, ids[k], None, config.cpus) for k in range(n)]
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    per = len(cores) // n
    if per < 1:
        raise ConfigError(f"parallel = {n} needs {n} CPU cores, a set of its own a lane; this process may use "
                          f"{len(cores)}")
    return [LaneResources(k, None, ",".join(str(c) for c in cores[k * per:(k + 1) * per]),
                          min(config.cpus, per) if config.cpus else float(per)) for k in range(n)]
