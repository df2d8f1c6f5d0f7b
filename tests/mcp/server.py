"""The MCP server the mcp tests host: an mcp SDK MCPServer over stdio or streamable HTTP, chosen by its argument.

    python tests/mcp/server.py stdio
    python tests/mcp/server.py streamable-http PORT

Its tools: echo, slow (sleeps, reporting progress), crash (exits the process), add_tool (adds a tool, so the
server sends notifications/tools/list_changed), sample (asks the client's model: a server→client request) and
whoami (the process's pid, to see which replica served).
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import SamplingMessage, TextContent

server = MCPServer("kiln-test-server", version="1.0", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Says the text back."""
    return text


@server.tool()
async def slow(seconds: float, ctx: Context) -> str:
    """Sleeps `seconds`, reporting progress ten times on the way."""
    for step in range(10):
        await asyncio.sleep(seconds / 10)
        await ctx.report_progress(step + 1, 10, f"{step + 1} of 10")
    return f"slept {seconds} s"


@server.tool()
def crash(code: int = 3) -> str:
    """Ends the process at once with `code`, saying so on stderr first."""
    print(f"crashing on request with code {code}", file=sys.stderr, flush=True)
    os._exit(code)


@server.tool()
async def add_tool(name: str, ctx: Context) -> str:
    """Adds a tool `name` that says its own name, and tells the clients that the tool list changed."""

    def added() -> str:
        return name

    server.add_tool(added, name=name, description=f"added by add_tool({name!r})")
    await ctx.session.send_tool_list_changed()
    return f"added {name}"


@server.tool()
async def sample(prompt: str, ctx: Context) -> str:
    """Asks the client's model (a sampling/createMessage request to the client) and says what it answered."""
    message = SamplingMessage(role="user", content=TextContent(type="text", text=prompt))
    result = await ctx.session.create_message([message], max_tokens=20)
    return f"the model said: {result.content.text}"


@server.tool()
def whoami() -> int:
    """The pid of the process that answered."""
    return os.getpid()


if __name__ == "__main__":
    transport = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2] if len(sys.argv) > 2 else os.environ["PORT"]))
