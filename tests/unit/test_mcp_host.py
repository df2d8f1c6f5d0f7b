"""mcp_host's input model, and the chosen public surface of kiln.tasks.mcp."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kiln.schemas.mcp_host import CommandServer, McpHostInput, UrlServer


def test_defaults_and_the_transport_each_server_kind_implies():
    command = McpHostInput.model_validate({"name": "tools", "server": {"command": ["python", "-m", "server"]}})
    assert isinstance(command.server, CommandServer)
    assert (command.transport, command.replicas, command.env) == ("stdio", 1, {})
    assert command.health.model_dump() == {"interval_s": 5.0, "timeout_s": 2.0, "failures": 3}
    assert command.restart.model_dump() == {"max_attempts": 5, "backoff_s": 1.0}
    remote = McpHostInput.model_validate({"name": "far", "server": {"url": "https://tools.example.org/mcp"}})
    assert isinstance(remote.server, UrlServer) and remote.transport == "streamable-http"


@pytest.mark.parametrize(("body", "complaint"), [
    ({"name": "x", "server": {"url": "https://a.example/mcp"}, "transport": "stdio"}, "reached over streamable-http"),
    ({"name": "x", "server": {"url": "https://a.example/mcp"}, "replicas": 2}, "kiln runs no copies"),
    ({"name": "x", "server": {"url": "https://a.example/mcp"}, "env": {"A": "1"}}, "takes no environment"),
    ({"name": "x", "server": {"url": "ftp://a.example/mcp"}}, "server"),
    ({"name": "x", "server": {"command": []}}, "server"),
    ({"name": "x", "server": {"command": [""]}}, "server"),
    ({"name": "x", "server": {"command": ["a"], "plugin": "b"}}, "server"),
    ({"name": "Not A Name", "server": {"command": ["a"]}}, "name"),
    ({"name": "x", "server": {"command": ["a"]}, "replicas": 0}, "replicas"),
    ({"name": "x", "server": {"command": ["a"]}, "transport": "sse"}, "transport"),
    ({"name": "x", "server": {"command": ["a"]}, "env": {"A=B": "1"}}, "is not an environment variable name"),
    ({"name": "x", "server": {"command": ["a"]}, "health": {"interval_s": 0}}, "health.interval_s"),
    ({"name": "x", "server": {"command": ["a"]}, "restart": {"max_attempts": 0}}, "restart.max_attempts"),
    ({"name": "x", "server": {"command": ["a"]}, "restart": {"tries": 3}}, "restart.tries"),
    ({"name": "x", "server": {"command": ["a"]}, "replica": 2}, "replica"),
    ({"name": "x", "server": {"plugin": "p"}, "transport": "streamable-http"}, "kiln speaks to it over stdio"),
    ({"name": "x", "server": {"command": ["a"]}, "limits": {"wall_seconds": 60}}, "runs until it is stopped"),
    ({"name": "x", "server": {"plugin": "p"}, "limits": {"wall_seconds": 60}}, "runs until it is stopped"),
    ({"name": "x", "server": {"command": ["a"]}, "limits": {"tmp_mb": 8}}, "tmp_mb: a command runs under the worker"),
    ({"name": "x", "server": {"url": "https://a.example/mcp"}, "limits": {"cpus": 1}}, "takes no limits"),
    ({"name": "x", "server": {"command": ["a"]}, "limits": {"memory_mb": 1}}, "limits.memory_mb"),
])  # fmt: skip
def test_what_is_refused_and_the_message_names_it(body, complaint):
    with pytest.raises(ValidationError) as refused:
        McpHostInput.model_validate(body)
    assert complaint in str(refused.value)


def test_a_plugin_server_speaks_stdio_and_each_server_takes_the_limits_it_can_be_held_to():
    plugin = McpHostInput.model_validate({"name": "p", "server": {"plugin": "tools"}, "limits": {"tmp_mb": 8}})
    assert (plugin.transport, plugin.limits.model_dump(exclude_none=True)) == ("stdio", {"tmp_mb": 8})
    with pytest.raises(ValidationError) as refused:
        McpHostInput.model_validate({"name": "p", "server": {"plugin": "tools"}, "transport": "streamable-http"})
    assert refused.value.errors()[0]["loc"] == ("transport",)
    command = McpHostInput.model_validate({"name": "c", "server": {"command": ["a"]}, "limits": {"memory_mb": 64}})
    from kiln.schemas.plugins import Limits

    assert command.limits.over(Limits()) == Limits(memory_mb=64)


def test_every_field_is_described():
    from kiln.schemas import mcp_host

    for model in (mcp_host.McpHostInput, mcp_host.CommandServer, mcp_host.PluginServer, mcp_host.UrlServer,
                  mcp_host.HealthCheck, mcp_host.RestartPolicy):  # fmt: skip
        assert all(info.description for info in model.model_fields.values()), model.__name__


def test_the_public_surface_of_kiln_tasks_mcp():
    import kiln.tasks.mcp

    assert kiln.tasks.mcp.__all__ == sorted(kiln.tasks.mcp.__all__)
    assert kiln.tasks.mcp.__all__ == [
        "Deployment", "DeploymentFailed", "Front", "Launcher", "McpHostError", "PingFailed", "ProcessHttpReplica",
        "RemoteReplica", "Replica", "ReplicaFailed", "ReplicaState", "ServerProcess", "ServerUnsupported", "Slot",
        "StdioReplica",
    ]  # fmt: skip
