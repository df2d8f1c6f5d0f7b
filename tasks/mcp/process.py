"""A server's process: started in a session of its own, so that stopping it takes its children too; its stderr kept."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from kiln.processes import die_with_parent
from kiln.tasks.mcp.errors import ReplicaFailed

TAIL_BYTES = 16 * 1024
STDERR_IN_REASON = 300  # characters of stderr's end in an "exited with code N" reason
STDOUT_LIMIT = 64 * 1024 * 1024  # the longest JSON-RPC line read from an stdio server
STDIN_CLOSE_SECONDS = 1.0  # an stdio server told to stop by closing its stdin has this long before SIGTERM
TERM_SECONDS = 2.0  # then this long before SIGKILL
# what a command's process gets of the worker's environment; the worker's own secrets stay out
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")


def command_env(env: Mapping[str, str]) -> dict[str, str]:
    """A command's environment: the harmless part of the worker's, and the deployment's `env` (and PORT) over it."""
    base = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    return {**base, **env}


class Enclosure(Protocol):
    """What holds a server's process besides its session, and goes with it: plugin_exec's sandbox (a plugin
    image's replica, kiln.tasks.plugin.Sandbox) or tier B's limits on a command (kiln.tasks.plugin.Confinement)."""

    def limit_reason(self, exit_code: int) -> str | None:
        """"out of memory (limit 256 MB)" when the process ended at a limit it hit."""

    async def kill(self) -> None:
        """Kills every process it holds."""

    async def teardown(self) -> None:
        """Removes all it made (container, cgroups, mounts, folders)."""


class ServerProcess:
    """One started server process. Its stdin and stdout are pipes when it speaks stdio; stderr is always read."""

    def __init__(self, process: asyncio.subprocess.Process, enclosure: Enclosure | None = None):
        self.process = process
        self.pid = process.pid
        self.enclosure = enclosure
        self._stderr = bytearray()
        self._stderr_reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], *, stdio: bool,
                    enclosure: Enclosure | None = None,
                    preexec: Callable[[], None] | None = None) -> ServerProcess:  # fmt: skip
        """Starts `argv` (the child runs `preexec` before exec); a program that cannot start at all is a
        ReplicaFailed saying why."""
        pipe_or_null = subprocess.PIPE if stdio else subprocess.DEVNULL
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=pipe_or_null, stdout=pipe_or_null, stderr=subprocess.PIPE, env=dict(env),
                start_new_session=True, limit=STDOUT_LIMIT, preexec_fn=functools.partial(_in_child, preexec),
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ReplicaFailed(f"could not start {argv[0]!r}: {reason}", "could not start") from None
        return cls(process, enclosure)

    async def _read_stderr(self) -> None:
        while chunk := await self.process.stderr.read(TAIL_BYTES):
            self._stderr += chunk
            del self._stderr[:-TAIL_BYTES]

    def stderr_tail(self, characters: int = STDERR_IN_REASON) -> str:
        """The end of what it wrote to stderr, on one line."""
        text = self._stderr.decode(errors="replace").strip()[-characters:]
        return " | ".join(line.strip() for line in text.splitlines() if line.strip())

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        code = await self.process.wait()
        with contextlib.suppress(asyncio.TimeoutError):  # the rest of stderr, unless a child still holds it open
            await asyncio.wait_for(asyncio.shield(self._stderr_reader), 0.5)
        return code

    def _limit_reason(self) -> str | None:
        code = self.process.returncode
        if code is None or self.enclosure is None:
            return None
        return self.enclosure.limit_reason(code if code >= 0 else 128 - code)

    def exit_reason(self) -> str:
        """How it ended, in a user's words, with stderr's end: "exited with code 1: Traceback … | ValueError: …";
        "out of memory (limit 256 MB)" when its enclosure says it ended at a limit."""
        code = self.process.returncode
        if code is None:
            return "still running"
        if limit := self._limit_reason():
            return limit
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            said = f"killed by signal {-code} ({name})"
        else:
            said = f"exited with code {code}"
        tail = self.stderr_tail()
        return f"{said}: {tail}" if tail else said

    def exit_cause(self) -> str:
        """The short form for a status line: "exit code 1", "signal 9"."""
        code = self.process.returncode
        if limit := self._limit_reason():
            return limit.split(" (")[0]  # "out of memory"
        return "no exit" if code is None else f"signal {-code}" if code < 0 else f"exit code {code}"

    async def stop(self) -> None:
        """Ends it and everything it started: stdin closed (the MCP way to ask an stdio server to go), then SIGTERM
        to its process group, then SIGKILL, to the group and to all its enclosure holds; then the enclosure is torn
        down. Returns once the process is reaped and nothing of it is left."""
        try:
            if self.process.returncode is None and self.process.stdin is not None:
                self.process.stdin.close()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), STDIN_CLOSE_SECONDS)
            if self.process.returncode is None:
                self._signal_group(signal.SIGTERM)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), TERM_SECONDS)
            # the group may outlive its leader (a child it started): nothing of it stays
            if self.enclosure is not None:
                await self.enclosure.kill()
            self._signal_group(signal.SIGKILL)
            await self.process.wait()
            self._stderr_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_reader
        finally:
            if self.enclosure is not None:
                await asyncio.shield(self.enclosure.teardown())

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _in_child(preexec: Callable[[], None] | None) -> None:
    """In the child before exec: SIGKILL when the process that started it dies, then `preexec`. A replica is in a
    session of its own, so a worker stopped or killed with its Dask processes would leave it running; a server over
    stdio ends at its stdin's EOF anyway, one over streamable HTTP would serve on for nobody (seen after `kiln up`
    stopped). A sandboxed replica's container is removed by the worker's cleanup of dead runs."""
    die_with_parent(signal.SIGKILL)
    if preexec is not None:
        preexec()


Launcher = Callable[[Sequence[str], Mapping[str, str], bool], Awaitable[ServerProcess]]
"""How a replica's process is started: (argv, the deployment's env, stdio) → a ServerProcess. An mcp_host job's
come from kiln.tasks.mcp.sandboxed: a command under tier B's limits, a plugin image in the sandbox."""


async def launch_command(argv: Sequence[str], env: Mapping[str, str], stdio: bool) -> ServerProcess:
    """A plain process under the worker, with no limits (the tests' and benchmarks' own servers)."""
    return await ServerProcess.start(argv, command_env(env), stdio=stdio)
