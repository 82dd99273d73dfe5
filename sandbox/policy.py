"""SandboxPolicy: every limit and hardening switch of a sandbox, in one place, with safe defaults."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_IMAGE = "labrat-sandbox:cpu"
WORKSPACE = "/workspace"
HOME = "/home/agent"


class SandboxPolicy(BaseModel):
    """How a container is started and what its processes may do.

    Defaults are the hardened ones; loosening one is an explicit, visible choice of the caller.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = DEFAULT_IMAGE
    runtime: Literal["runc", "runsc"] = "runc"
    # The agent's code never needs the network; "none" gives the container only its own loopback.
    network_mode: Literal["none"] = "none"
    user: str = "agent"
    workspace: str = WORKSPACE
    # Writable directories that together hold all of the container's persistent state (used when flattening).
    state_dirs: tuple[str, ...] = (WORKSPACE, HOME)
    cap_drop: tuple[str, ...] = ("ALL",)
    # Capabilities given back (for harness-owned containers only, e.g. SETUID/SETGID for an evaluation
    # driver that runs the model as another user). Never for a container that runs agent code as root.
    cap_add: tuple[str, ...] = ()
    no_new_privileges: bool = True
    # A read-only root file system: the bounded /tmp tmpfs is then the only place a process can write
    # (for containers that are never snapshotted and must not fill the host's disk, like evaluation's).
    read_only: bool = False
    init: bool = True  # tini as PID 1 reaps zombies and forwards signals
    pids_limit: int = Field(256, ge=16)
    memory_bytes: int = Field(2 * 1024**3, ge=64 * 1024**2)
    cpus: float | None = Field(None, gt=0)  # None: all host cores
    # The host cores the container may run on ("0", "2-3", "0,4"): a lane's own, so that two experiments in
    # flight never share a core. None: any.
    cpuset: str | None = Field(None, pattern=r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
    tmp_bytes: int = Field(256 * 1024**2, ge=1024**2)  # /tmp is a tmpfs: never snapshotted, bounded
    disk_bytes: int = Field(4 * 1024**3, ge=1024**2)  # bytes the container may add to its writable layer
    file_size_bytes: int = Field(2 * 1024**3, ge=1024**2)  # RLIMIT_FSIZE: one file cannot exceed this
    disk_poll_seconds: float = Field(0.5, gt=0)
    gpus: Literal["all"] | list[str] | None = None  # "all", or device ids/indices
    kill_leftovers: bool = True  # processes an exec starts never outlive it (background jobs, setsid)
    exec_timeout: float = Field(600.0, gt=0)  # default wall-clock limit of one exec, seconds (host clock)
    max_output_bytes: int = Field(64 * 1024, ge=1024)  # per stream, head and tail kept
    max_file_bytes: int = Field(16 * 1024**2, ge=1024)  # read_file / write_file limit
    env: dict[str, str] = Field(default_factory=dict)
    # Host directories bind-mounted read-only, container path -> host path (e.g. the training split at /data).
    # Never snapshotted. The files must be readable by the agent's uid; hold nothing secret in them.
    ro_mounts: dict[str, str] = Field(default_factory=dict)

    @field_validator("ro_mounts")
    @classmethod
    def _absolute_mounts(cls, mounts: dict[str, str]) -> dict[str, str]:
        for target, source in mounts.items():
            if not target.startswith("/") or not source.startswith("/"):
                raise ValueError(f"mount {source!r} -> {target!r}: both paths must be absolute")
            if any(target == d or target.startswith(d.rstrip("/") + "/") for d in (WORKSPACE, HOME)):
                raise ValueError(f"mount target {target} is inside a state directory; it would shadow snapshotted files")
        return mounts

    @field_validator("gpus", mode="before")
    @classmethod
    def _parse_gpus(cls, value):
        # Accept the CLI spelling "0,1" as well as a list.
        if isinstance(value, str) and value not in ("all", ""):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value or None

    @field_validator("env")
    @classmethod
    def _no_secrets(cls, env: dict[str, str]) -> dict[str, str]:
        # The API key lives only in the host process; refuse anything that looks like a credential.
        for key in env:
            if any(word in key.upper() for word in ("KEY", "TOKEN", "SECRET", "PASSWORD")):
                raise ValueError(f"env var {key!r} looks like a secret; secrets never enter a sandbox")
        return env
