"""The core of mcp_host: MCP servers run as replicas behind one streamable-HTTP front, kept healthy and scaled."""

from kiln.tasks.mcp.deployment import Deployment, ReplicaState, Slot
from kiln.tasks.mcp.errors import DeploymentFailed, McpHostError, PingFailed, ReplicaFailed, ServerUnsupported
from kiln.tasks.mcp.front import Front
from kiln.tasks.mcp.process import Launcher, ServerProcess
from kiln.tasks.mcp.replica import ProcessHttpReplica, RemoteReplica, Replica, StdioReplica

__all__ = [
    "Deployment",
    "DeploymentFailed",
    "Front",
    "Launcher",
    "McpHostError",
    "PingFailed",
    "ProcessHttpReplica",
    "RemoteReplica",
    "Replica",
    "ReplicaFailed",
    "ReplicaState",
    "ServerProcess",
    "ServerUnsupported",
    "Slot",
    "StdioReplica",
]
