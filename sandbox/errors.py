"""Errors the sandbox raises. Each message is one line that says what happened and what to do.

The CLI prints `str(error)` and exits; the harness returns it to the agent. No traceback is needed to act on them.
"""


class SandboxError(Exception):
    """Base class: anything the sandbox layer refuses or cannot do."""


class EngineUnavailable(SandboxError):
    """The Docker engine cannot be reached (down, wrong socket, no permission)."""


class ImageMissing(SandboxError):
    """An image the sandbox needs is not present on the engine."""


class RuntimeUnavailable(SandboxError):
    """The requested OCI runtime (runsc) or the NVIDIA runtime is not registered with the engine."""


class SandboxClosed(SandboxError):
    """The sandbox's container is gone (closed, removed, or killed)."""


class PathRefused(SandboxError):
    """A path leaves the workspace (`..`, absolute outside it, or a symlink that escapes)."""


class FileMissing(SandboxError):
    """A workspace path that should exist does not."""


class FileTooLarge(SandboxError):
    """A file read or write exceeds the policy's size limit."""


class SnapshotMissing(SandboxError):
    """A snapshot image is not present (garbage-collected, never imported, or a typo)."""


class BuildFailed(SandboxError):
    """Building the base or sandbox image failed."""
