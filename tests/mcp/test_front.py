"""The front, with the mcp SDK's own client: tools listed and called on each kind of replica, ids that collide across
sessions, notifications passed on, sessions kept on their replica, and HTTP's session rules."""

from __future__ import annotations

import asyncio
import subprocess

import httpx
import pytest
from mcp import Client, types
from mcp.shared.exceptions import MCPError
from kiln.tasks.mcp.replica import free_port
from tests.mcp.conftest import COMMANDS, PYTHON, SERVER, RawSession, hosted, mcp_session, whoami


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_tools_are_listed_and_called_through_the_front_with_their_progress(launches, transport):
    async with hosted(launches, {"server": {"command": COMMANDS[transport]}, "transport": transport}) as host:
        async with mcp_session(host.url) as session:
            assert session.server_info.name == "kiln-test-server"
            tools = {tool.name for tool in (await session.list_tools()).tools}
            assert tools == {"echo", "slow", "crash", "add_tool", "sample", "whoami"}
            assert (await session.call_tool("echo", {"text": "héllo"})).content[0].text == "héllo"
            progress = []

            async def on_progress(done, total, message):
                progress.append((done, total))

            result = await session.call_tool("slow", {"seconds": 0.5}, progress_callback=on_progress)
            assert result.content[0].text == "slept 0.5 s"
            assert progress == [(step, 10) for step in range(1, 11)]
            assert await whoami(session) == host.launched[0]


async def test_mcp_server_time_over_stdio(launches):
    async with hosted(launches, {"server": {"command": [PYTHON, "-m", "mcp_server_time"]}}) as host:
        async with mcp_session(host.url) as session:
            assert session.server_info.name == "mcp-time"
            assert "get_current_time" in {tool.name for tool in (await session.list_tools()).tools}
            result = await session.call_tool("get_current_time", {"timezone": "UTC"})
            assert not result.is_error
            assert '"timezone": "UTC"' in result.content[0].text or "UTC" in result.content[0].text


async def test_a_remote_url_is_fronted(launches):
    port = free_port()
    remote = subprocess.Popen([PYTHON, SERVER, "streamable-http", str(port)], start_new_session=True)
    launches.pids.append(remote.pid)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        async with hosted(launches, {"server": {"url": url}}) as host:
            assert host.deployment.spec.transport == "streamable-http"
            async with mcp_session(host.url) as session:
                assert (await session.call_tool("echo", {"text": "far"})).content[0].text == "far"
                assert await whoami(session) == remote.pid
    finally:
        remote.terminate()
        remote.wait()


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_two_sessions_sending_the_same_ids_each_see_only_their_own_answers(launches, transport):
    """supergateway #35 and #138: one shared stdio process, two clients, the same JSON-RPC ids at once."""
    async with hosted(launches, {"server": {"command": COMMANDS[transport]}, "transport": transport}) as host:
        async with httpx.AsyncClient(timeout=30) as client:
            first, second = await RawSession(client, host.url).open(), await RawSession(client, host.url).open()
            assert first.id != second.id

            async def calls(session: RawSession, who: str) -> list[tuple[int, str]]:
                seen = []
                for round_ in range(40):
                    answers = await asyncio.gather(*(session.call(request_id, "echo", {"text": f"{who}{round_}.{request_id}"})
                                                     for request_id in (1, 2, 3)))  # fmt: skip
                    seen += [(answer["id"], answer["result"]["content"][0]["text"]) for answer in answers]
                return seen

            mine, theirs = await asyncio.gather(calls(first, "a"), calls(second, "b"))
        assert mine == [(i, f"a{r}.{i}") for r in range(40) for i in (1, 2, 3)]
        assert theirs == [(i, f"b{r}.{i}") for r in range(40) for i in (1, 2, 3)]


async def test_tools_list_changed_reaches_every_session_of_a_shared_stdio_server(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}) as host:
        heard: dict[str, list[str]] = {"a": [], "b": []}

        def listener(who):
            async def handle(message):
                heard[who].append(getattr(message, "method", type(message).__name__))

            return handle

        async with mcp_session(host.url, message_handler=listener("a")) as a, \
                mcp_session(host.url, message_handler=listener("b")) as b:  # fmt: skip
            await asyncio.sleep(0.5)  # both GET streams open, where notifications outside a request go
            assert (await a.call_tool("add_tool", {"name": "extra"})).content[0].text == "added extra"
            await host.until(lambda: all("notifications/tools/list_changed" in h for h in heard.values()), 10,
                             f"list_changed at both clients: {heard}")  # fmt: skip
            assert "extra" in {tool.name for tool in (await b.list_tools()).tools}
            assert (await b.call_tool("extra", {})).content[0].text == "extra"


async def test_tools_list_changed_reaches_the_session_over_streamable_http(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["streamable-http"]}, "transport": "streamable-http"}) as host:
        heard = []

        async def handle(message):
            heard.append(getattr(message, "method", None))

        async with mcp_session(host.url, message_handler=handle) as session:
            await asyncio.sleep(0.5)
            await session.call_tool("add_tool", {"name": "extra"})
            await host.until(lambda: "notifications/tools/list_changed" in heard, 10, f"list_changed: {heard}")


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_each_session_stays_on_its_replica_and_new_ones_go_to_the_least_busy(launches, transport):
    spec = {"server": {"command": COMMANDS[transport]}, "transport": transport, "replicas": 3}
    async with hosted(launches, spec) as host:
        await host.until(lambda: host.deployment.status() == "3 of 3 replicas healthy", 30, "3 healthy")
        async with mcp_session(host.url) as a, mcp_session(host.url) as b, mcp_session(host.url) as c:
            served = {name: {await whoami(session) for _ in range(5)} for name, session in (("a", a), ("b", b), ("c", c))}
        assert all(len(pids) == 1 for pids in served.values()), served
        assert set().union(*served.values()) == set(host.launched[:3]), "one session on each replica"


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_http_session_rules(launches, transport):
    async with hosted(launches, {"server": {"command": COMMANDS[transport]}, "transport": transport}) as host:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
            unknown = await client.post(host.url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                                        headers={**headers, "mcp-session-id": "no-such-session"})  # fmt: skip
            assert unknown.status_code == 404
            assert "initialize" in unknown.json()["error"]["message"]

            session = await RawSession(client, host.url).open()
            assert (await session.post({"jsonrpc": "2.0", "id": 7, "method": "ping"})) == {"jsonrpc": "2.0", "id": 7,
                                                                                           "result": {}}  # fmt: skip
            # a client that takes only JSON gets JSON
            only_json = await client.post(host.url, json={"jsonrpc": "2.0", "id": 8, "method": "ping"},
                                          headers={**headers, "accept": "application/json", "mcp-session-id": session.id})  # fmt: skip
            if transport == "stdio":  # the front answers JSON to a client that takes only JSON
                assert only_json.json() == {"jsonrpc": "2.0", "id": 8, "result": {}}
            else:  # the test server, as the SDK's servers do in SSE mode, refuses it: the front passes that on
                assert only_json.status_code == 406
            ended = await client.delete(host.url, headers={"mcp-session-id": session.id})
            assert ended.status_code == 200
            after = await client.post(host.url, json={"jsonrpc": "2.0", "id": 9, "method": "ping"},
                                      headers={**headers, "mcp-session-id": session.id})  # fmt: skip
            assert after.status_code == 404
            assert host.deployment.front.sessions == {}


async def test_a_client_that_accepts_only_json_gets_json_answers_over_stdio(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}) as host:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"accept": "application/json", "content-type": "application/json"}
            opened = await client.post(host.url, headers=headers, json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                       "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                                                  "clientInfo": {"name": "json", "version": "0"}}})  # fmt: skip
            assert opened.headers["content-type"] == "application/json"
            assert opened.json()["result"]["serverInfo"]["name"] == "kiln-test-server"
            headers["mcp-session-id"] = opened.headers["mcp-session-id"]
            called = await client.post(host.url, headers=headers, json={"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                                       "params": {"name": "echo", "arguments": {"text": "plain"}}})  # fmt: skip
            assert called.json()["result"]["content"][0]["text"] == "plain"


async def test_a_request_outside_a_session_is_refused_by_a_shared_stdio_server(launches):
    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}) as host:
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(host.url, json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
                                       headers={"accept": "application/json, text/event-stream"})  # fmt: skip
        assert answer.status_code == 400
        assert answer.json()["id"] == 3
        assert "initialize" in answer.json()["error"]["message"]


async def test_a_server_request_goes_to_the_one_session_with_a_request_in_flight_else_it_is_refused(launches):
    """Over shared stdio, sampling reaches the client whose tools/call asked for it when that is the only session
    with a request in flight; when another session also waits, the front cannot tell and refuses it."""

    async def model(context, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="forty-two"),
                                         model="test-model")  # fmt: skip

    async with hosted(launches, {"server": {"command": COMMANDS["stdio"]}}) as host:
        async with mcp_session(host.url, sampling_callback=model) as asking, mcp_session(host.url) as other:
            await asyncio.sleep(0.5)  # the GET stream open: a JSON-answered call's server requests go there
            answer = await asking.call_tool("sample", {"prompt": "the answer?"})
            assert answer.content[0].text == "the model said: forty-two"
            waiting = asyncio.create_task(other.call_tool("slow", {"seconds": 1.5}))
            await asyncio.sleep(0.3)
            with pytest.raises(MCPError, match="cannot tell which client sampling/createMessage is for: 2 sessions"):
                await asking.call_tool("sample", {"prompt": "again?"})  # the server passes the front's refusal on
            assert not (await waiting).is_error


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
async def test_the_sdks_client_which_probes_the_2026_protocol_first_works_through_the_front(launches, transport):
    """mcp.Client's default mode sends server/discover outside any session: a shared stdio server refuses it (the
    client falls back to initialize), an HTTP one gets it relayed and answers as it would directly."""
    async with hosted(launches, {"server": {"command": COMMANDS[transport]}, "transport": transport}) as host:
        async with Client(host.url) as client:
            assert (await client.call_tool("echo", {"text": "auto"})).content[0].text == "auto"
