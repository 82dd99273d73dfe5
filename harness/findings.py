"""A check's result as `labrat doctor` prints it: one line with a level."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class Level(StrEnum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    level: Level
    check: str
    message: str
