"""The mcp_host job's input: an MCP server kiln runs as replicas behind one streamable-HTTP URL, kept healthy."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from kiln.schemas.plugin_exec import LimitsOverride
from kiln.schemas.plugins import PLUGIN_NAME, check_env_names

McpTransport = Literal["stdio", "streamable-http"]


class CommandServer(BaseModel):
    """A server kiln starts as a process under the worker, once per replica."""

    model_config = ConfigDict(extra="forbid", strict=True)

    command: list[str] = Field(
        min_length=1, description="The program and its arguments. Over streamable-http, `{port}` in an argument is "
        "replaced by the loopback port the replica must listen on (also given as the environment variable PORT).",
    )

    @field_validator("command")
    @classmethod
    def _program_named(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("the program (the command's first item) is empty")
        return value


class PluginServer(BaseModel):
    """A registered plugin's image, run in plugin_exec's sandbox, once per replica, speaking MCP over stdio."""

    model_config = ConfigDict(extra="forbid", strict=True)

    plugin: str = Field(pattern=PLUGIN_NAME, description="A registered plugin (`kiln plugins list`).")


class UrlServer(BaseModel):
    """A remote server kiln fronts: nothing to start, its health still checked."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(
        pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2000,
        description="The server's streamable-HTTP endpoint, http(s)://host[:port]/path.",
    )


class HealthCheck(BaseModel):
    """How a replica's health is checked: an MCP ping round trip over its own transport."""

    model_config = ConfigDict(extra="forbid", strict=True)

    interval_s: float = Field(5.0, ge=0.1, le=3600, description="Seconds between two pings of a replica.")
    timeout_s: float = Field(2.0, gt=0, le=300, description="Seconds a ping may take before it counts as failed.")
    failures: int = Field(
        3, ge=1, le=100, description="Failed pings in a row after which the replica is restarted. A new replica "
        "must answer its first ping within failures × (interval_s + timeout_s) seconds, and at least 10 s.",
    )


class RestartPolicy(BaseModel):
    """How a replica that exits or fails its health checks is restarted."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_attempts: int = Field(
        5, ge=1, le=100, description="Failed attempts in a row (exits, failed starts, failed health) after which "
        "the deployment fails, with the reason of each attempt.",
    )
    backoff_s: float = Field(
        1.0, ge=0, le=600, description="Seconds before the second attempt in a row, doubling for each next one; "
        "a replica that stopped after serving healthily is restarted at once.",
    )


class McpHostInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(
        pattern=PLUGIN_NAME, description="The deployment's name in its URL, /api/v1/mcp/{name}/mcp: lowercase "
        "letters, digits and dashes.",
    )
    server: CommandServer | PluginServer | UrlServer = Field(
        description="What serves: {'command': [...]}, {'plugin': NAME} or {'url': 'http(s)://…'}."
    )
    transport: McpTransport | None = Field(
        None, description="How kiln talks to the server: stdio (the default for a command or plugin, and a plugin's "
        "only transport: its sandbox has no network) or streamable-http (a command's option, a url's only transport).",
    )
    replicas: int = Field(1, ge=1, le=32, description="Copies of the server kiln runs; sessions are spread over them.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the server's process (a command or plugin)."
    )
    limits: LimitsOverride = Field(
        default_factory=LimitsOverride, description="What each replica may use, over the plugin's limits (a plugin) "
        "or the defaults (a command: cpus 1, memory_mb 512, pids 64, held as plugin_exec's sandbox tier B holds "
        "them: cgroups where the worker may make them, else rlimits; a default the worker cannot hold is left "
        "unheld). A server runs until it is stopped: wall_seconds is refused, and a command takes only cpus, "
        "memory_mb and pids. A limit given that the worker cannot enforce fails the job before any replica starts, "
        "naming it.",
    )
    health: HealthCheck = Field(default_factory=HealthCheck, description="How each replica's health is checked.")
    restart: RestartPolicy = Field(default_factory=RestartPolicy, description="How failed replicas are restarted.")

    _env_names = field_validator("env")(check_env_names)

    @field_validator("transport")
    @classmethod
    def _plugin_speaks_stdio(cls, value: McpTransport | None, info: ValidationInfo) -> McpTransport | None:
        if value == "streamable-http" and isinstance(info.data.get("server"), PluginServer):
            raise ValueError("a plugin's server runs in the sandbox, whose network is its own loopback alone, so "
                             "nothing outside can reach a port it listens on; kiln speaks to it over stdio (give "
                             "transport 'stdio', or leave it out)")  # fmt: skip
        return value

    @field_validator("limits")
    @classmethod
    def _limits_fit_the_server(cls, value: LimitsOverride, info: ValidationInfo) -> LimitsOverride:
        given = set(value.model_dump(exclude_none=True))
        server = info.data.get("server")
        if given and isinstance(server, UrlServer):
            raise ValueError("a url server is not started by kiln, so it takes no limits")
        if "wall_seconds" in given:
            raise ValueError("wall_seconds: a server runs until it is stopped, so it has no wall time")
        if isinstance(server, CommandServer) and given & {"output_mb", "tmp_mb"}:
            field = sorted(given & {"output_mb", "tmp_mb"})[0]
            raise ValueError(f"{field}: a command runs under the worker, with no /out or /tmp of its own; it takes "
                             "cpus, memory_mb and pids")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _transport_fits_the_server(self) -> McpHostInput:
        if isinstance(self.server, UrlServer):
            if self.transport == "stdio":
                raise ValueError("transport: a url server is reached over streamable-http, not stdio")
            if self.env:
                raise ValueError("env: a url server is not started by kiln, so it takes no environment")
            if self.replicas != 1:
                raise ValueError("replicas: a url server is one remote server; kiln runs no copies of it")
            self.transport = "streamable-http"
        elif self.transport is None:
            self.transport = "stdio"
        return self
