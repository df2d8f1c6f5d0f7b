"""What can go wrong in an MCP deployment, each with a message in a user's words.

    McpHostError
    ├── ServerUnsupported   a Deployment was given a server it cannot start (a plugin without a sandbox launcher)
    ├── PingFailed          one MCP round trip to a replica failed: no answer in time, an error, a lost connection
    ├── ReplicaFailed       one attempt of a replica failed: it could not start, exited, never answered its first
    │                       ping, or failed its health checks in a row
    └── DeploymentFailed    a replica failed restart.max_attempts attempts in a row; says what each attempt did
"""

from __future__ import annotations


class McpHostError(Exception):
    """The root of the MCP deployment's errors."""


class ServerUnsupported(McpHostError):
    """The deployment's server cannot be started as it was given: a plugin needs its command and a sandbox launcher."""


class PingFailed(McpHostError):
    """An MCP round trip to a replica failed; the message says how."""


class ReplicaFailed(McpHostError):
    """One attempt of a replica failed: `reason` says how in full, `cause` in a few words for a status line."""

    def __init__(self, reason: str, cause: str):
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


class DeploymentFailed(McpHostError):
    """A replica failed all its attempts; the message gives each attempt's reason."""
