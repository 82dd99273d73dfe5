"""Agents drive a session through its Toolbox until `session.stop_reason()` says to stop.

    agent = make_agent(config, "offline")      # or "claude"
    reason = agent.run(Toolbox(session))       # a one-line stop reason
"""

from __future__ import annotations

from typing import Protocol

from harness.config import LabConfig
from harness.tools import Toolbox


class AgentFailed(Exception):
    """The agent cannot go on (the API kept failing after retries); the session is saved and resumable."""


class Agent(Protocol):
    name: str
    model: str | None

    def run(self, toolbox: Toolbox) -> str:
        """Work until the session must stop; return why it stopped."""
        ...


def make_agent(config: LabConfig, program: str) -> Agent:
    if config.agent == "claude":
        from harness.agents.claude import ClaudeAgent

        return ClaudeAgent(config, program)
    from harness.agents.offline import OfflineAgent

    return OfflineAgent(config)
