"""The MCP conformance suite's server scenarios, differentially: the in-repo server direct, and deployed through kiln.

Runs `@modelcontextprotocol/conformance` (0.1.16, Node ≥ 22) `server --suite all` against tests/mcp/server.py over
streamable HTTP on a loopback port, and against the same server deployed through its own embedded kiln (two
mcp_host deployments: over streamable-http and over stdio), then compares what passed. The server is not the
suite's own scenario server, so many scenarios fail on it directly (its tools are not the ones they call): the
suite is used differentially, and the question is only whether kiln changes anything.

The suite has no option for a request header, and kiln's URL needs the kiln key as bearer. So each run goes
through a loopback proxy of this script's own that adds `Authorization: Bearer <key>` to each request's head and
passes every other byte both ways untouched (Host and Origin included, bodies and SSE streams as they come). The
direct server is run through the same proxy (it ignores the header) and once more without it, which shows the
proxy changes nothing on its own.

Node and the suite come from npm, never at test time: with --install this script runs
`npm install --prefix NODE_DIR node@22` and `npm install --prefix SUITE_DIR @modelcontextprotocol/conformance@0.1.16`;
without it, a missing Node 22 or suite is reported and the script exits 0, having run nothing.

    python bench/mcp_conformance.py [--node-dir /tmp/node22] [--suite-dir /tmp/mcp-conformance] [--install]
                                    [--json FILE] [--keep DIR]

It exits 1 when a kiln path's set of passing scenarios differs from the direct one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from common import REPO, embedded_stack, free_port, stop, stop_jobs

SUITE = "@modelcontextprotocol/conformance@0.1.16"
SUITE_ENTRY = Path("node_modules/@modelcontextprotocol/conformance/dist/index.js")
SERVER = REPO / "tests" / "mcp" / "server.py"
NAMES = {"streamable-http": "conformance-http", "stdio": "conformance-stdio"}
DIRECT, DIRECT_PROXIED = "direct", "direct, via the proxy"
KILN = {t: f"kiln URL, {t} replica" for t in NAMES}
PASS, FAIL = "pass", "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node-dir", type=Path, default=Path("/tmp/node22"), help="npm prefix holding node@22")
    parser.add_argument("--suite-dir", type=Path, default=Path("/tmp/mcp-conformance"), help=f"npm prefix of {SUITE}")
    parser.add_argument("--install", action="store_true", help="npm-install Node 22 and the suite there if missing")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every check's result there as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the suite's own result folders there")
    args = parser.parse_args()

    node = find_node(args.node_dir, args.install)
    suite = args.suite_dir / SUITE_ENTRY
    if node is not None and not suite.exists() and args.install:
        npm(node, ["install", "--prefix", str(args.suite_dir), SUITE])
    if node is None or not suite.exists():
        missing = "Node ≥ 22" if node is None else f"{SUITE} in {args.suite_dir}"
        print(f"skipped: no {missing}. Run with --install (npm fetches node@22 into {args.node_dir} and the suite "
              f"into {args.suite_dir}), or point --node-dir/--suite-dir at them.")  # fmt: skip
        return

    results_dir = args.keep or Path(tempfile.mkdtemp(prefix="mcp-conformance-"))
    direct_port = free_port()
    server = subprocess.Popen([sys.executable, str(SERVER), "streamable-http", str(direct_port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    load = os.getloadavg()[0]
    runs: dict[str, dict] = {}
    try:
        wait_listening(direct_port)
        with embedded_stack(slots=1, env={"KILN_WORKER_SERVICE_SLOTS": "2"}) as (settings, _, key):
            from kiln.sdk import Client

            with Client(settings.api_url, key) as client:
                jobs = []
                try:
                    for transport in NAMES:
                        jobs.append(deploy(client, transport))
                    for job in jobs:
                        wait_healthy(client, job.id)
                    api_port = int(settings.api_url.rsplit(":", 1)[1])
                    bearer = f"Bearer {key}".encode()
                    direct_url = f"http://127.0.0.1:{direct_port}/mcp"
                    runs[DIRECT] = run_suite(node, suite, direct_url, results_dir / "direct")
                    with bearer_proxy(direct_port, bearer) as port:
                        runs[DIRECT_PROXIED] = run_suite(node, suite, f"http://127.0.0.1:{port}/mcp",
                                                         results_dir / "direct-proxied")  # fmt: skip
                    with bearer_proxy(api_port, bearer) as port:
                        for transport, name in NAMES.items():
                            url = f"http://127.0.0.1:{port}/api/v1/mcp/{name}/mcp"
                            runs[KILN[transport]] = run_suite(node, suite, url, results_dir / f"kiln-{transport}")
                finally:
                    stop_jobs(client, jobs)
    finally:
        stop(server, grace=5)

    differ = report(runs, load, node, results_dir if args.keep else None)
    if args.json:
        args.json.write_text(json.dumps({"load_average": load, "runs": runs}, indent=2) + "\n")
        print(f"every check's result written to {args.json}")
    if not args.keep:
        shutil.rmtree(results_dir, ignore_errors=True)
    if differ:
        raise SystemExit(f"the passing scenarios differ from direct on: {', '.join(differ)}")


# Node and the suite


def find_node(node_dir: Path, install: bool) -> Path | None:
    """A Node ≥ 22: the one on PATH, else node@22 under node_dir (npm-installed there with --install)."""
    for candidate in (shutil.which("node"), node_dir / "node_modules" / ".bin" / "node"):
        if candidate and node_major(Path(candidate)) >= 22:
            return Path(candidate)
    if install and shutil.which("npm"):
        node_dir.mkdir(parents=True, exist_ok=True)
        npm(None, ["install", "--prefix", str(node_dir), "node@22"])
        return find_node(node_dir, install=False)
    return None


def node_major(node: Path) -> int:
    try:
        said = subprocess.run([str(node), "--version"], capture_output=True, text=True, timeout=30).stdout
        return int(said.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def npm(node: Path | None, argv: list[str]) -> None:
    env = dict(os.environ)
    if node is not None:  # npm's scripts run with the Node 22 first on PATH
        env["PATH"] = f"{node.parent}{os.pathsep}{env['PATH']}"
    print(f"npm {' '.join(argv)}", flush=True)
    subprocess.run(["npm", *argv], check=True, env=env)


def run_suite(node: Path, suite: Path, url: str, out: Path) -> dict[str, list[dict]]:
    """Every server scenario against `url`: {scenario: [its checks: id, status, errorMessage]}."""
    out.mkdir(parents=True, exist_ok=True)
    print(f"conformance server --suite all --url {url}", flush=True)
    done = subprocess.run([str(node), str(suite), "server", "--url", url, "--suite", "all", "-o", str(out)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    (out / "output.txt").write_text(done.stdout + done.stderr)
    scenarios = {}
    for folder in sorted(out.iterdir()):
        checks = folder / "checks.json"
        if folder.is_dir() and checks.exists():
            scenario = folder.name.removeprefix("server-").rsplit("-", 6)[0]  # "-2026-11-30T07-38-14-982Z"
            scenarios[scenario] = [{"id": c["id"], "status": c["status"], "error": c.get("errorMessage")}
                                   for c in json.loads(checks.read_text())]  # fmt: skip
    if not scenarios:
        raise SystemExit(f"the suite left no results against {url}: {(done.stdout + done.stderr)[-500:]}")
    return scenarios


def passed(checks: list[dict]) -> bool:
    """As the suite's own summary counts it: no check failed."""
    return not any(check["status"] == "FAILURE" for check in checks)


# the proxy that adds the kiln key


@contextmanager
def bearer_proxy(upstream_port: int, authorization: bytes):
    """A loopback proxy to 127.0.0.1:upstream_port that sets `Authorization` in each request's head and passes every
    other byte as it comes; yields its port. HTTP/1.1 keep-alive: requests are framed by Content-Length or chunked."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = free_port()
    start = asyncio.start_server(lambda r, w: connection(r, w, upstream_port, authorization), "127.0.0.1", port)
    server = asyncio.run_coroutine_threadsafe(start, loop).result(10)
    try:
        yield port
    finally:
        server.close()
        asyncio.run_coroutine_threadsafe(server.wait_closed(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def connection(client_r, client_w, upstream_port: int, authorization: bytes) -> None:
    try:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        client_w.close()
        return
    back = asyncio.ensure_future(copy(upstream_r, client_w))
    try:
        while head := await client_r.readuntil(b"\r\n\r\n"):
            lines = head.split(b"\r\n")
            fields = [line for line in lines[1:] if line and not line.lower().startswith(b"authorization:")]
            upstream_w.write(b"\r\n".join([lines[0], *fields, b"Authorization: " + authorization]) + b"\r\n\r\n")
            named = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip() for line in fields}
            if b"chunked" in named.get(b"transfer-encoding", b"").lower():
                while True:
                    size_line = await client_r.readuntil(b"\r\n")
                    upstream_w.write(size_line)
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        while (trailer := await client_r.readuntil(b"\r\n")) != b"\r\n":
                            upstream_w.write(trailer)
                        upstream_w.write(b"\r\n")
                        break
                    upstream_w.write(await client_r.readexactly(size + 2))
            elif length := int(named.get(b"content-length", b"0")):
                upstream_w.write(await client_r.readexactly(length))
            await upstream_w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        upstream_w.close()
        await asyncio.gather(back, return_exceptions=True)
        client_w.close()


async def copy(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


# the stack


def deploy(client, transport: str):
    listen = ["streamable-http", "{port}"] if transport == "streamable-http" else ["stdio"]
    return client.mcp.deploy(NAMES[transport], command=[sys.executable, str(SERVER), *listen], transport=transport)


def wait_healthy(client, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while (job := client.jobs.get(job_id)).status_reason != "1 of 1 replica healthy":
        if job.status.is_final or time.monotonic() > deadline:
            raise SystemExit(f"the deployment {job.input['name']!r} is not serving: {job.status.value} "
                             f"({job.status_reason})")  # fmt: skip
        time.sleep(0.2)


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"tests/mcp/server.py did not listen on port {port} within {timeout:g} s")


# the report


def report(runs: dict[str, dict], load: float, node: Path, kept: Path | None) -> list[str]:
    version = subprocess.run([str(node), "--version"], capture_output=True, text=True).stdout.strip()
    print()
    print(f"{SUITE}, server scenarios (--suite all), Node {version}, against tests/mcp/server.py; load average "
          f"{load:.2f}")  # fmt: skip
    names = list(runs)
    scenarios = list(dict.fromkeys(s for run in runs.values() for s in run))
    width = max(map(len, scenarios)) + 2
    print(f"{'scenario':<{width}}" + "".join(f"{n[:24]:>26}" for n in names))
    for scenario in scenarios:
        cells = [(PASS if passed(run[scenario]) else FAIL) if scenario in run else "missing" for run in runs.values()]
        print(f"{scenario:<{width}}" + "".join(f"{c:>26}" for c in cells))
    print()
    baseline = {s for s, checks in runs[DIRECT].items() if passed(checks)}
    print(f"passing directly ({len(baseline)} of {len(runs[DIRECT])}): {', '.join(sorted(baseline))}")
    differ = []
    for name in names[1:]:
        passing = {s for s, checks in runs[name].items() if passed(checks)}
        if passing == baseline:
            print(f"{name}: the same {len(passing)}")
            continue
        differ.append(name)
        print(f"{name}: {len(passing)} pass; only directly: {sorted(baseline - passing) or 'none'}; only here: "
              f"{sorted(passing - baseline) or 'none'}")  # fmt: skip
    # a failing scenario can fail differently: every check whose status or error is not the direct one's
    print()
    for name in names[1:]:
        for scenario in scenarios:
            ours, theirs = runs[DIRECT].get(scenario, []), runs[name].get(scenario, [])
            if outcomes(ours) != outcomes(theirs):
                print(f"{name}, {scenario}: direct {brief(ours)}; here {brief(theirs)}")
    if kept:
        print(f"the suite's own results are in {kept}")
    return differ


def outcomes(checks: list[dict]) -> list[tuple]:
    return [(check["id"], check["status"], check["error"]) for check in checks]


def brief(checks: list[dict]) -> str:
    return "; ".join(f"{c['id']} {c['status']}" + (f" ({c['error'][:160]})" if c["error"] else "") for c in checks) \
        or "not run"


if __name__ == "__main__":
    main()
