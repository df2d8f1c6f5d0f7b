"""A plugin as a Prefect Block: a containerized program, imported once into KILN_HOME, that plugin_exec jobs run.

A plugin is registered by name (`kiln plugins add NAME --image FILE …` or POST /api/v1/plugins). Registration
imports its image into the content-addressed store first (kiln.tasks.plugin.register), so the block names an
image that is there and unpacked: its manifest digest and its folder. What a run executes defaults to the
image's own Entrypoint and Cmd; its limits are the defaults a run may lower or raise.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from kiln.blocks import registered
from kiln.errors import InputInvalid
from kiln.schemas.plugin_exec import LimitsOverride, PluginExecInput
from kiln.schemas.plugins import Limits, check_input_schema


class Plugin(Block):
    """A containerized program kiln runs in its sandbox, with its default command, environment and limits."""

    _block_type_name: ClassVar[str] = "kiln plugin"
    _block_type_slug: ClassVar[str] = "kiln-plugin"
    _description: ClassVar[str] = (
        "A containerized program (an OCI or docker-save image, imported into KILN_HOME) that kiln's plugin_exec "
        "jobs run in a sandbox."
    )

    image_digest: str = Field(description="The image's manifest digest, 'sha256:…': what the plugin runs.")
    image_path: str = Field(description="The image's folder in the store (KILN_HOME/plugin-images/sha256-…).")
    entrypoint: list[str] = Field(description="The program and its first arguments (the image's Entrypoint unset).")
    args: list[str] = Field(default_factory=list, description="Arguments after the entrypoint.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of every run, over the image's own.")
    limits: Limits = Field(default_factory=Limits, description="The limits of a run that asks for none.")
    input_schema: dict[str, Any] | None = Field(
        None, description="A JSON Schema a run's input must match; any input when unset."
    )
    tier: Literal["A", "B"] | None = Field(None, description="The sandbox tier every run needs; any when unset.")
    description: str = Field("", description="What the plugin does.")
    project_id: str | None = Field(
        None, description="The project whose key registered it through the API: only that project may replace it. "
        "None for an operator's (`kiln plugins add`).",
    )

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: list[str]) -> list[str]:
        if not value or not value[0]:
            raise ValueError("no program to run: give an entrypoint, or use an image with an Entrypoint or Cmd")
        return value

    @field_validator("input_schema")
    @classmethod
    def _input_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_input_schema(value)

    @property
    def argv(self) -> list[str]:
        """The command a run executes: entrypoint, then args."""
        return [*self.entrypoint, *self.args]

    def limits_for(self, override: LimitsOverride) -> Limits:
        """A run's limits: the plugin's, with what the run gives in their place."""
        return override.over(self.limits)

    def input_problems(self, value: Any) -> list[dict[str, Any]]:
        """Where a run's input fails the plugin's input schema, as error details under input.input; none when it
        matches (or the plugin has no schema)."""
        if self.input_schema is None:
            return []
        import jsonschema

        validator = jsonschema.validators.validator_for(self.input_schema, default=jsonschema.Draft202012Validator)
        errors = sorted(validator(self.input_schema).iter_errors(value), key=lambda e: list(e.absolute_path))
        return [{"loc": ["input", "input", *e.absolute_path], "msg": e.message, "type": "input_schema"}
                for e in errors[:20]]  # fmt: skip

    def summary(self, name: str) -> dict[str, Any]:
        """What GET /api/v1/plugins shows: everything but the environment's values (they may be secret)."""
        shown = self.model_dump(mode="json", exclude={"block_type_slug", "env", "project_id"})
        return {"name": name, **shown, "env_names": sorted(self.env)}


async def registered_plugins() -> dict[str, Plugin]:
    """Every registered plugin by name, read from the Prefect API."""
    return await registered(Plugin)


async def load_plugin(name: str) -> Plugin | None:
    """The registered plugin called `name`, or None."""
    try:
        return await Plugin.aload(name)
    except ValueError:
        return None


async def plugin_for_run(name: str, field: str = "input.plugin") -> Plugin:
    """The registered plugin a job names (a plugin_exec's input.plugin, an mcp_host's input.server.plugin);
    InputInvalid naming the field and the registered ones."""
    plugin = await load_plugin(name)
    if plugin is None:
        known = sorted(await registered_plugins())
        raise InputInvalid(
            f"{field}: no plugin {name!r} is registered; registered: {', '.join(known) or 'none'} "
            "(`kiln plugins add`, POST /api/v1/plugins)",
            details=[{"loc": field.split("."), "msg": "unknown plugin", "type": "unknown_plugin", "input": name,
                      "registered": known}],
        )  # fmt: skip
    return plugin


async def check_server(job_input, settings=None) -> None:
    """At an mcp_host job's submission (JobType.check): a plugin server names a registered plugin."""
    from kiln.schemas.mcp_host import PluginServer

    if isinstance(job_input.server, PluginServer):
        await plugin_for_run(job_input.server.plugin, field="input.server.plugin")


async def check_run(job_input: PluginExecInput, settings=None) -> None:
    """At submission (JobType.check): the plugin is registered and the input matches its schema."""
    plugin = await plugin_for_run(job_input.plugin)
    problems = plugin.input_problems(job_input.input)
    if problems:
        raise InputInvalid("; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems),
                           details=problems)  # fmt: skip
