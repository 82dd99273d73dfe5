"""`labrat doctor`'s look at the host's NVIDIA stack: the driver and GPUs, the container toolkit (versions
with known container escapes are refused) and whether gVisor's nvproxy supports this driver and GPU.

The facts come from the host's own tools (nvidia-smi, nvidia-ctk or nvidia-container-cli, runsc); the
judgement is a pure function of them (`stack_findings`), so it is tested on their real output formats
on a machine without a GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from harness.config import LabConfig
from harness.findings import Finding, Level

# The NVIDIA Container Toolkit's container escapes, each fixed in the version named: a GPU container could
# reach the host's file system (CVE-2024-0132, CVE-2025-23359: TOCTOU in the mount logic) or run code on the
# host through LD_PRELOAD in its createContainer hook (CVE-2025-23266, "NVIDIAScape").
TOOLKIT_ESCAPES = (((1, 16, 2), "CVE-2024-0132"), ((1, 17, 4), "CVE-2025-23359"), ((1, 17, 8), "CVE-2025-23266"))
TOOLKIT_MIN = max(fixed for fixed, _ in TOOLKIT_ESCAPES)
# The GPUs gVisor documents nvproxy as tested on; others may work, so they are a warning, not an error.
NVPROXY_TESTED_GPUS = ("T4", "L4", "A100", "A10G", "H100")
TOOL_TIMEOUT = 30  # seconds; nvidia-smi can hang on a wedged GPU


@dataclass(frozen=True)
class GpuStack:
    """What the host's tools said; None where a tool is missing or failed."""
    gpus: list[tuple[str, str]] | None  # (name, driver version) per GPU, from nvidia-smi
    toolkit: tuple[int, int, int] | None
    runsc_args: list[str] | None  # the engine's runsc runtimeArgs; None when runsc is not registered
    nvproxy_drivers: set[str] | None  # driver versions runsc's nvproxy supports


def _tool(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_gpus(csv: str) -> list[tuple[str, str]]:
    """`nvidia-smi --query-gpu=name,driver_version --format=csv,noheader` lines: (name, driver)."""
    rows = [line.rsplit(",", 1) for line in csv.splitlines() if "," in line]
    return [(name.strip(), driver.strip()) for name, driver in rows]


def parse_toolkit_version(text: str) -> tuple[int, int, int] | None:
    """The version in `nvidia-ctk --version` ("... CLI version 1.17.8") or `nvidia-container-cli --version`
    ("cli-version: 1.17.8")."""
    found = re.search(r"version:?\s*v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in found.groups()) if found else None  # type: ignore[return-value]


def parse_nvproxy_drivers(text: str) -> set[str]:
    """`runsc nvproxy list-supported-drivers`: one driver version a line."""
    return {line.strip() for line in text.splitlines() if re.fullmatch(r"\d+(\.\d+)+", line.strip())}


def read_stack(info: dict) -> GpuStack:
    """Ask the host's tools (`info` is the engine's /info: its registered runtimes)."""
    csv = _tool("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
    toolkit_text = _tool("nvidia-ctk", "--version") or _tool("nvidia-container-cli", "--version")
    runsc = info.get("Runtimes", {}).get("runsc")
    drivers = _tool((runsc or {}).get("path") or "runsc", "nvproxy", "list-supported-drivers")
    return GpuStack(gpus=parse_gpus(csv) if csv is not None else None,
                    toolkit=parse_toolkit_version(toolkit_text) if toolkit_text else None,
                    runsc_args=list(runsc.get("runtimeArgs") or []) if runsc is not None else None,
                    nvproxy_drivers=parse_nvproxy_drivers(drivers) if drivers is not None else None)


def _version(parts: tuple[int, ...]) -> str:
    return ".".join(map(str, parts))


def stack_findings(stack: GpuStack, config: LabConfig | None) -> list[Finding]:
    gpu_lab = config is not None and bool(config.gpus)
    gvisor_gpu_lab = gpu_lab and config.runtime == "runsc"
    if not stack.gpus:
        level = Level.ERROR if gpu_lab else Level.INFO
        return [Finding(level=level, check="nvidia", message="no NVIDIA driver on this host (nvidia-smi found no "
                        "GPU): the toolkit and gVisor's nvproxy were not checked")]
    drivers = sorted({driver for _, driver in stack.gpus})
    names = sorted({name for name, _ in stack.gpus})
    findings = [Finding(level=Level.OK, check="nvidia", message=(
        f"driver {', '.join(drivers)}; {len(stack.gpus)} GPU(s): {', '.join(names)}"))]
    if stack.toolkit is None:
        findings.append(Finding(level=Level.ERROR if gpu_lab else Level.WARN, check="toolkit", message=(
            "NVIDIA Container Toolkit not found (nvidia-ctk, nvidia-container-cli): containers cannot get GPUs; "
            f"install {_version(TOOLKIT_MIN)} or later")))
    elif stack.toolkit < TOOLKIT_MIN:
        open_escapes = [cve for fixed, cve in TOOLKIT_ESCAPES if stack.toolkit < fixed]
        findings.append(Finding(level=Level.ERROR, check="toolkit", message=(
            f"NVIDIA Container Toolkit {_version(stack.toolkit)} has known container escapes "
            f"({', '.join(open_escapes)}): upgrade to {_version(TOOLKIT_MIN)} or later before running agents")))
    else:
        findings.append(Finding(level=Level.OK, check="toolkit", message=(
            f"NVIDIA Container Toolkit {_version(stack.toolkit)} (no known container escape; "
            f"{_version(TOOLKIT_MIN)}+ needed)")))
    findings += _nvproxy_findings(stack, drivers, names, Level.ERROR if gvisor_gpu_lab else Level.WARN)
    return findings


def _nvproxy_findings(stack: GpuStack, drivers: list[str], names: list[str], problem: Level) -> list[Finding]:
    if stack.runsc_args is None:
        return [Finding(level=Level.INFO, check="nvproxy", message="runsc not registered: no GPUs under gVisor")]
    if "--nvproxy" not in stack.runsc_args and "--nvproxy=true" not in stack.runsc_args:
        return [Finding(level=problem, check="nvproxy", message=(
            "runsc is registered without --nvproxy: a GPU lab under gVisor sees no GPU "
            "(re-run scripts/setup-host.sh on this host to register it)"))]
    if stack.nvproxy_drivers is None:
        return [Finding(level=problem, check="nvproxy", message=(
            "this runsc cannot list nvproxy's supported drivers (too old for GPUs?): install a newer gVisor"))]
    unsupported = [driver for driver in drivers if driver not in stack.nvproxy_drivers]
    if unsupported:
        newest = max(stack.nvproxy_drivers, key=lambda v: tuple(map(int, v.split("."))), default="none")
        return [Finding(level=problem, check="nvproxy", message=(
            f"this runsc's nvproxy does not support driver {', '.join(unsupported)} (it supports "
            f"{len(stack.nvproxy_drivers)} versions, newest {newest}): install a driver it lists "
            "(`runsc nvproxy list-supported-drivers`) or a newer gVisor, or use runtime = \"runc\""))]
    untested = [name for name in names if not any(re.search(rf"\b{gpu}\b", name) for gpu in NVPROXY_TESTED_GPUS)]
    if untested:
        return [Finding(level=Level.WARN, check="nvproxy", message=(
            f"driver supported, but gVisor documents nvproxy as tested on {', '.join(NVPROXY_TESTED_GPUS)} only, "
            f"not {', '.join(untested)}: try `labrat smoke` under runsc before a long session"))]
    return [Finding(level=Level.OK, check="nvproxy", message=(
        f"runsc --nvproxy supports driver {', '.join(drivers)} on {', '.join(names)}"))]


def check_gpu_stack(info: dict, config: LabConfig | None) -> list[Finding]:
    return stack_findings(read_stack(info), config)
