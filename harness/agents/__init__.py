"""Agents drive a session through its Toolbox until the lab's view says to stop.

    agent = make_agent(config, program)        # harness/run.py: offline, or claude
    reason = agent.run(toolbox, lab_view)      # a one-line stop reason
"""

from __future__ import annotations

from typing import Protocol

from harness.session import LabView
from harness.tools import Toolbox


class AgentFailed(Exception):
    """The agent cannot go on (the API kept failing after retries); the session is saved and resumable."""


class Agent(Protocol):
    name: str
    model: str | None

    def run(self, toolbox: Toolbox, lab: LabView) -> str:
        """Work through the toolbox until `lab.stop_reason()` says to stop; return why it stopped."""
        ...
