"""The `mcp_host` job: MCP servers deployed as a persistent job, at one stable, authenticated URL on the kiln API.

kiln.tasks.mcp runs the replicas and their front; the kiln API serves /api/v1/mcp/{name}/mcp and forwards to
the front (kiln.api.mcp). The job runs until it is cancelled; it fails when the deployment does (a replica that
failed all its restarts), with each attempt's reason.
"""

from __future__ import annotations

from prefect import flow
from prefect.states import Failed

from kiln.errors import KilnError
from kiln.schemas.job_types import JobType
from kiln.schemas.mcp_host import McpHostInput


@flow(name="mcp_host", persist_result=True, result_serializer="json")
async def mcp_host(input: McpHostInput):
    from kiln.tasks.mcp.errors import McpHostError
    from kiln.tasks.mcp.serve import serve_deployment

    try:
        reason = await serve_deployment(input)
    except (McpHostError, KilnError) as exc:  # failed before it served: say only why
        return Failed(message=str(exc))
    return Failed(message=reason)


JOB_TYPE = JobType(
    name="mcp_host",
    description="MCP servers (a command over stdio or streamable HTTP under the sandbox's tier B limits, a "
    "registered plugin's image in the sandbox over stdio, or a remote URL) served as a persistent job "
    "at /api/v1/mcp/{name}/mcp: replicas kept healthy by MCP pings, restarted with backoff, scaled live.",
    input_model=McpHostInput,
    flow=mcp_host,
    persistent=True,
    check="kiln.blocks.plugin:check_server",
    cacheable=False,
    tags=("mcp",),
)
