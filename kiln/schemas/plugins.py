"""Plugins as kiln registers them: the limits of a run and what a registration says besides its image."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kiln.schemas.strict import StrictRequest

# a plugin's name is its Prefect block's name, which Prefect allows only in these characters
PLUGIN_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class Limits(BaseModel):
    """The resources of one plugin run; each is enforced by the tier or the run is refused before it starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, gt=0, le=64, description="CPU cores the plugin may keep busy (a CFS quota per period).")
    memory_mb: int = Field(512, ge=16,
                           description="Memory of all its processes together, tmpfs pages included; no swap.")
    pids: int = Field(64, ge=4, le=4096, description="Processes and threads alive at once, the plugin included.")
    wall_seconds: float = Field(60, gt=0, description="Time from start to kill, whatever the plugin is doing.")
    output_mb: int = Field(10, ge=1, description="Size of /out, the only place whose files come back.")
    tmp_mb: int = Field(64, ge=1, description="Size of /tmp (and of /dev/shm).")


def check_input_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema unchanged if it is a valid JSON Schema (of the draft its `$schema` names, 2020-12 if none);
    a ValueError naming the keyword at fault otherwise."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
    return schema


def check_env_names(cls, value: dict[str, str]) -> dict[str, str]:
    """The environment unchanged, or a ValueError naming a variable name no process can have (for validators)."""
    for name in value:
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"{name!r} is not an environment variable name")
    return value


class PluginSpec(StrictRequest):
    """A plugin's registration besides its image: what to run in it, with what, and what input it takes."""

    name: str = Field(pattern=PLUGIN_NAME, description="The plugin's name: lowercase letters, digits and dashes.")
    entrypoint: list[str] | None = Field(
        None, description="The program and its first arguments; the image's Entrypoint (then Cmd) when unset."
    )
    args: list[str] | None = Field(
        None, description="Arguments after the entrypoint; the image's Cmd when neither entrypoint nor args is given."
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of every run, over the image's own. Listings show "
        "only their names, but do not keep secrets here: they are stored in the Prefect block as given.",
    )
    limits: Limits = Field(default_factory=Limits, description="The limits of a run that asks for none.")
    input_schema: dict[str, Any] | None = Field(
        None, description="A JSON Schema the input of every run must match; checked as a JSON Schema here."
    )
    tier: Literal["A", "B"] | None = Field(
        None, description="The sandbox tier every run needs: A (runc, cgroups) or B (bubblewrap); any when unset."
    )
    description: str = Field("", max_length=2000, description="What the plugin does, for people choosing one.")
    overwrite: bool = Field(False, description="Replace a plugin already registered under this name (else 409).")

    _env_names = field_validator("env")(check_env_names)

    @field_validator("input_schema")
    @classmethod
    def _input_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_input_schema(value)
