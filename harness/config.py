"""labrat.toml: the lab's configuration, validated by pydantic. Bad config is one line naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_FILE = "labrat.toml"


class ConfigError(Exception):
    """labrat.toml is missing, unparsable, or has an invalid value; the message names the key."""


# What `labrat init` writes for a new lab where it differs from a key's default: a labrat.toml without the key
# (an older lab) keeps the older behaviour, a greedy keep rule and one baseline run.
NEW_LAB_SETTINGS = {"keep_rule": "significant", "noise_seeds": 3}
SIZE_CLASS_DEFAULTS = {
    "gpu": {"time_budget": 300.0, "memory_gb": 32.0, "disk_gb": 8.0, "eval_tokens": 2_097_152, "eval_timeout": 900.0},
}


class LabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    agent: Literal["offline", "claude"] = "offline"
    model: str = "claude-sonnet-4-6"  # used by the claude agent (claude-sonnet-4-5 reaches end of life 2026-11-30)
    trainer_config: Literal["cpu-tiny", "gpu"] = "cpu-tiny"
    time_budget: float = Field(45.0, gt=0, description="all-in wall-clock seconds of one training run on the "
                               "host's clock (start, data, compile, training, saving); killed at the deadline")
    deterministic_steps: int | None = Field(None, ge=1, description="train this many steps, bit-identically, instead of for the time budget")
    max_experiments: int | None = Field(5, ge=1)
    max_hours: float | None = Field(None, gt=0)
    runtime: Literal["runc", "runsc"] = "runc"
    gpus: str | None = None  # "all" or "0,1"
    data: str = "synthetic"  # or a file, a directory, or an http(s) URL
    data_sha256: str | None = None
    tokenizer: Literal["bytes", "bpe"] = Field("bytes", description="bytes (one token a byte) or bpe (byte-level BPE "
                                               "trained on the lab's training split, fixed with the data)")
    vocab_size: int = Field(4096, gt=256, le=65_536, description="the BPE vocabulary's size (with tokenizer = bpe)")
    seed: int = 1337
    keep_rule: Literal["better", "better_by", "significant"] = Field(
        "better", description="better (any gain), better_by (a gain over min_improvement), or significant (a gain "
        "beyond the noise, confirmed with fresh seeds: docs/noise.md)")
    min_improvement: float = Field(0.0, ge=0, description="bpb a result must gain to be kept, with better_by")
    noise_seeds: int = Field(1, ge=1, le=20, description="runs of the baseline with different harness seeds at the "
                             "lab's start (the noise floor), and of a candidate under the significant rule")
    significance: float = Field(0.05, gt=0, lt=0.5, description="the significant rule's false-keep rate for a change "
                                "that cannot matter (a one-sided t-test's level)")
    # The research program's frame (program.md): a run that breaks one is discarded with the reason.
    max_params: int | None = Field(None, ge=1, description="weights a model may have (its checkpoint's tensors, "
                                   "counted by the evaluation before the model's code runs)")
    max_memory_gb: float | None = Field(None, gt=0, description="peak memory a training run may use (its "
                                        "container's cgroup, read by the harness); memory_gb is the hard limit")
    min_tokens_per_second: float | None = Field(None, gt=0, description="training throughput a run must reach, "
                                                "as train.py's summary reports it (train.py's own count)")
    memory_gb: float = Field(4.0, gt=0)
    disk_gb: float = Field(4.0, gt=0, description="GiB a container may add to its writable layer (bounds every snapshot)")
    cpus: float | None = Field(None, gt=0)
    eval_tokens: int = Field(131_072, ge=1024, description="held-out tokens scored per evaluation")
    eval_timeout: float = Field(600.0, gt=0, description="seconds the evaluation may take")
    compile_cache_mb: int = Field(0, ge=0, description="MiB of inductor/Triton compile cache kept between training "
                                  "runs (0: off; on, a warm run trains longer and runs can pass data: docs/security.md)")
    max_tool_calls: int = Field(40, ge=1, description="agent tool calls allowed between two experiments")
    parallel: int = Field(1, ge=1, le=64, description="agents at work at once (lanes), each with its own working "
                          "container, lineage, and GPU (from gpus) or share of the CPU cores")
    adopt_best: bool = Field(True, description="with lanes: a lane whose base another lane has beaten moves to the "
                             "lab's best")

    @model_validator(mode="before")
    @classmethod
    def _size_class_defaults(cls, values):
        # A key left out takes its size class's default: the gpu config needs more memory (CUDA, inductor's
        # compile workers), a longer budget and more held-out tokens for a standard error below 0.001 bpb.
        if isinstance(values, dict):
            values = {**SIZE_CLASS_DEFAULTS.get(values.get("trainer_config", "cpu-tiny"), {}), **values}
        return values

    @model_validator(mode="after")
    def _significant_needs_replicates(self) -> LabConfig:
        if self.keep_rule == "significant" and self.noise_seeds < 2:
            raise ValueError("keep_rule = significant needs noise_seeds of 2 or more (each candidate is confirmed)")
        return self

    @model_validator(mode="after")
    def _lanes_share_no_compile_cache(self) -> LabConfig:
        if self.parallel > 1 and self.compile_cache_mb:
            raise ValueError("compile_cache_mb with parallel > 1 is not supported yet: one lab cache, written by one "
                             "lane at a time; turn one of them off")
        return self

    @model_validator(mode="before")
    @classmethod
    def _drop_grace(cls, values):
        # `grace` (seconds allowed past the budget) is gone: the budget is all-in and the host kills at its
        # deadline. Configs recorded by older sessions still load; their grace no longer applies.
        if isinstance(values, dict) and "grace" in values:
            values = {k: v for k, v in values.items() if k != "grace"}
        return values


def load_config(lab: Path) -> LabConfig:
    path = Path(lab) / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `labrat init {lab}` first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    try:
        return LabConfig(**raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {key}: {error['msg']}") from None


def apply_overrides(config: LabConfig, **overrides) -> LabConfig:
    """The config with command-line overrides (None = not given), validated like the file."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return LabConfig(**{**config.model_dump(), **given})
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise ConfigError(f"--{key.replace('_', '-')}: {error['msg']}") from None
