"""The plugin_exec job's input: one run of a registered plugin in the sandbox, with its input, files and limits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.schemas.files import InputFile
from kiln.schemas.plugins import PLUGIN_NAME, Limits, check_env_names

SandboxTier = Literal["A", "B"]


class LimitsOverride(BaseModel):
    """Limits of one run, over the plugin's defaults: only what is given changes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    cpus: float | None = Field(None, gt=0, le=64, description="CPU cores the plugin may keep busy.")
    memory_mb: int | None = Field(None, ge=16, description="Memory of all its processes together, tmpfs included.")
    pids: int | None = Field(None, ge=4, le=4096, description="Processes and threads alive at once.")
    wall_seconds: float | None = Field(None, gt=0, description="Time from start to kill.")
    output_mb: int | None = Field(None, ge=1, description="Size of /out, the only place whose files come back.")
    tmp_mb: int | None = Field(None, ge=1, description="Size of /tmp.")

    def over(self, base: Limits) -> Limits:
        """The limits `base` (a plugin's, or the defaults) with what is given here in their place."""
        return Limits.model_validate({**base.model_dump(), **self.model_dump(exclude_none=True)})


class PluginExecInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    plugin: str = Field(pattern=PLUGIN_NAME, description="A registered plugin (`kiln plugins list`).")
    args: list[str] | None = Field(
        None, description="Arguments after the plugin's entrypoint, instead of the plugin's own args."
    )
    input: Any = Field(
        None, description="JSON given to the plugin as /in/input.json and on stdin; checked against the plugin's "
        "input schema when it has one.",
    )
    files: list[InputFile] = Field(
        default_factory=list, max_length=100,
        description="Files uploaded with POST /api/v1/files (names or sha256), read-only under /in by their names.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables, over the plugin's own.")
    limits: LimitsOverride = Field(
        default_factory=LimitsOverride, description="Limits of this run over the plugin's; each is enforced or the run "
        "fails before it starts, naming the limit.",
    )
    tier: SandboxTier | None = Field(
        None, description="The sandbox tier the run needs: A (runc, cgroups) or B (bubblewrap); by default the "
        "plugin's setting, else the best the worker offers.",
    )

    _env_names = field_validator("env")(check_env_names)

