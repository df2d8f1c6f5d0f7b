"""A server's process: started in a session of its own, so that stopping it takes its children too; its stderr kept."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence

from kiln.tasks.mcp.errors import ReplicaFailed

TAIL_BYTES = 16 * 1024
STDERR_IN_REASON = 300  # characters of stderr's end in an "exited with code N" reason
STDOUT_LIMIT = 64 * 1024 * 1024  # the longest JSON-RPC line read from an stdio server
STDIN_CLOSE_SECONDS = 1.0  # an stdio server told to stop by closing its stdin has this long before SIGTERM
TERM_SECONDS = 2.0  # then this long before SIGKILL
PR_SET_PDEATHSIG = 1
# what a command's process gets of the worker's environment; the worker's own secrets stay out
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")


def command_env(env: Mapping[str, str], port: int | None = None) -> dict[str, str]:
    """A command's environment: the harmless part of the worker's, the deployment's `env` over it, and PORT."""
    base = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    return {**base, **env, **({"PORT": str(port)} if port is not None else {})}


class ServerProcess:
    """One started server process. Its stdin and stdout are pipes when it speaks stdio; stderr is always read."""

    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.pid = process.pid
        self._stderr = bytearray()
        self._stderr_reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def start(cls, argv: Sequence[str], env: Mapping[str, str], *, stdio: bool) -> ServerProcess:
        """Starts `argv`; a program that cannot start at all is a ReplicaFailed saying why."""
        pipe_or_null = subprocess.PIPE if stdio else subprocess.DEVNULL
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=pipe_or_null, stdout=pipe_or_null, stderr=subprocess.PIPE, env=dict(env),
                start_new_session=True, limit=STDOUT_LIMIT, preexec_fn=_die_with_parent,
            )  # fmt: skip
        except OSError as error:
            raise ReplicaFailed(f"could not start {argv[0]!r}: {error.strerror or error}", "could not start") from None
        return cls(process)

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

    def exit_reason(self) -> str:
        """How it ended, in a user's words, with stderr's end: "exited with code 1: Traceback … | ValueError: …"."""
        code = self.process.returncode
        if code is None:
            return "still running"
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
        return "no exit" if code is None else f"signal {-code}" if code < 0 else f"exit code {code}"

    async def stop(self) -> None:
        """Ends it and everything it started: stdin closed (the MCP way to ask an stdio server to go), then SIGTERM
        to its process group, then SIGKILL. Returns once the process is reaped."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), STDIN_CLOSE_SECONDS)
        if self.process.returncode is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), TERM_SECONDS)
        # the group may outlive its leader (a child it started): nothing of it stays
        self._signal_group(signal.SIGKILL)
        await self.process.wait()
        self._stderr_reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr_reader

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies. A replica is in a session of its own,
    so a worker stopped or killed with its Dask processes would leave it running; a server over stdio ends at its
    stdin's EOF anyway, one over streamable HTTP would serve on for nobody (seen after `kiln up` stopped)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


Launcher = Callable[[Sequence[str], Mapping[str, str], bool], Awaitable[ServerProcess]]
"""How a replica's process is started: (argv, env, stdio) → a ServerProcess. A plain process by default
(ServerProcess.start); a plugin image's replica will pass one that starts it in the sandbox."""


async def launch_command(argv: Sequence[str], env: Mapping[str, str], stdio: bool) -> ServerProcess:
    return await ServerProcess.start(argv, env, stdio=stdio)
