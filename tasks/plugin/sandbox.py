"""One plugin run in the sandbox, from input to Outcome, and the removal of what a killed worker left behind.

A run lives in <work_dir>/<container id>/: in/ (input files, read-only in the sandbox at /in) and out/, on
which a size-limited tmpfs is mounted in a mount namespace of its own, held by a small `sh` until the run's
files are copied out. The sandbox is started inside that namespace and binds the tmpfs at /out; nothing is
ever mounted in the worker's namespace, and when the holder goes (its stdin closes with the worker) so does
the tmpfs.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from kiln.errors import InvalidRequest
from kiln.tasks.plugin.cgroups import RunCgroups, can_limit
from kiln.tasks.plugin.images import ImageRef
from kiln.tasks.plugin.limits import Ending, Limits, SandboxFailed
from kiln.tasks.plugin.tiers import TIERS, Bundle, Tier, confine, detect_tier, process_hits, process_limits

log = logging.getLogger(__name__)

PREFIX = "kiln-"
TAIL_BYTES = 64 * 1024
STDERR_IN_REASON = 500  # characters of stderr's end in an "exited with code N" reason
KILL_SECONDS = 2.0  # a killed sandbox is gone by then
POLL_SECONDS = 0.25  # how often a running sandbox's pids counter is read
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# holds /out's tmpfs: mounts it, says so, then waits for its stdin to close
HOLDER = 'mount -t tmpfs -o "$1" kiln-out "$2" && echo mounted && read _'


@dataclass
class Outcome:
    """How a run ended and what it left: exactly one ending, with its reason in a user's words."""

    ending: Ending
    reason: str  # "out of memory (limit 256 MB)", "exited with code 3: <end of stderr>", …
    exit_code: int  # the plugin's; 128 + n when a signal n ended it
    stdout: str  # the last 64 KB
    stderr: str  # the last 64 KB
    output: Any = None  # /out/output.json parsed, when present and JSON
    files: list[str] = field(default_factory=list)  # what /out held, copied into the results folder
    seconds: float = 0.0
    tier: str = ""
    enforcement: dict[str, str] = field(default_factory=dict)  # limit → how the tier enforced it


class _Tail:
    """The last TAIL_BYTES of a stream; whole lines go to a callback as they arrive."""

    def __init__(self, on_line: Callable[[str], None] | None = None):
        self.data = bytearray()
        self.partial = bytearray()
        self.on_line = on_line

    async def read(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(TAIL_BYTES):
            self.data += chunk
            del self.data[:-TAIL_BYTES]
            if self.on_line:
                self.partial += chunk
                *lines, rest = self.partial.split(b"\n")
                self.partial = bytearray(rest[-TAIL_BYTES:])
                for line in lines:
                    self._give(line)
        if self.on_line and self.partial:
            self._give(self.partial)

    def _give(self, line: bytes) -> None:
        try:
            self.on_line(line.decode(errors="replace"))
        except Exception:  # a failing callback must not stop the reading, or the plugin blocks on a full pipe
            log.exception("the stdout callback failed")

    def text(self) -> str:
        return self.data.decode(errors="replace")


class _OutTmpfs:
    """/out's tmpfs in a mount namespace held open by a `sh` until close()."""

    def __init__(self, holder: asyncio.subprocess.Process, mountpoint: Path, userns: bool):
        self.holder = holder
        # how the sandbox is started inside the namespace, and where the worker reads the tmpfs from outside it
        self.enter = ["nsenter", f"--target={holder.pid}", "--mount",
                      *(["--user", "--preserve-credentials"] if userns else [])]  # fmt: skip
        self.path = Path(f"/proc/{holder.pid}/root") / mountpoint.relative_to("/")

    @classmethod
    async def mount(cls, mountpoint: Path, size_mb: int, options: str, userns: bool) -> _OutTmpfs:
        unshare = ["unshare", "--mount", "--propagation", "private",
                   *(["--user", "--map-root-user"] if userns else [])]  # fmt: skip
        holder = await asyncio.create_subprocess_exec(
            *unshare, "sh", "-c", HOLDER, "sh", f"size={size_mb}m,{options}", str(mountpoint),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            said = await holder.stdout.readline()
        except BaseException:  # cancelled while it starts: it must not wait for an stdin nobody closes
            holder.kill()
            raise
        if said != b"mounted\n":
            error = (await holder.stderr.read()).decode().strip()
            await holder.wait()
            raise SandboxFailed(f"sandbox: could not mount the /out tmpfs: {error or 'the holder exited'}")
        return cls(holder, mountpoint, userns)

    def full(self) -> bool:
        """Whether the plugin filled it: a write past output_mb got ENOSPC."""
        stats = os.statvfs(self.path)
        return stats.f_bavail == 0

    def copy_to(self, results_dir: Path) -> list[str]:
        """Copies its regular files (symlinks and special files are skipped) into results_dir; their paths."""
        copied = []
        for folder, _, names in os.walk(self.path):
            for name in names:
                source = Path(folder) / name
                relative = source.relative_to(self.path)
                if not source.is_file() or source.is_symlink():
                    continue
                (results_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                try:
                    shutil.copyfile(source, results_dir / relative, follow_symlinks=False)
                except PermissionError:  # the plugin took its own read permission away: its loss, not the run's
                    log.warning("%s: /out/%s is not readable; not copied", self.path, relative)
                    continue
                copied.append(str(relative))
        return sorted(copied)

    async def close(self) -> None:
        if self.holder.returncode is None:
            self.holder.stdin.close()
            try:
                await asyncio.wait_for(self.holder.wait(), KILL_SECONDS)
            except asyncio.TimeoutError:
                self.holder.kill()
                await self.holder.wait()


class Sandbox:
    """One process of a plugin image in the sandbox, from its bundle to its teardown: `await start()` gives the
    process (stdin, stdout and stderr pipes), `kill()` ends it, `hits()` says which limits it ran into, and
    `teardown()` removes everything it had (container, cgroups, /out's tmpfs, its folder).

    A plugin_exec run (PluginRun) waits for it to end; an mcp_host replica (`persistent`) keeps it serving until
    it is stopped: then there is no wall time, and no limit may be derived from one (tiers.process_limits).
    """

    def __init__(self, image: ImageRef, *, run_id: str, work_dir: Path, limits: Limits = Limits(),
                 command: Sequence[str] | None = None, env: Mapping[str, str] | None = None, tier: str | None = None,
                 persistent: bool = False):  # fmt: skip
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", run_id):
            raise InvalidRequest(f"run_id: {run_id!r} is not 1-41 letters, digits, '_', '.' or '-'")
        argv = list(command) if command else image.argv
        if not argv:
            raise InvalidRequest("command: the image has no Entrypoint or Cmd; give a command")
        if tier is None:
            check = detect_tier()
            if check.tier is None:
                raise SandboxFailed(f"sandbox: this worker offers no sandbox tier ({'; '.join(check.notes)})")
            tier = check.tier
        self.tier: Tier = TIERS[tier]
        self.enforcement = self.tier.enforcement(limits, persistent=persistent)  # refuses before anything starts
        image_env = [v for v in image.env if not any(v.startswith(f"{k}=") for k in env or {})]
        user_env = [f"{k}={v}" for k, v in (env or {}).items()]
        has_path = any(v.startswith("PATH=") for v in image_env + user_env)
        container_id = f"{PREFIX}{run_id}-{secrets.token_hex(3)}"
        self.bundle = Bundle(id=container_id, dir=Path(work_dir).resolve() / container_id, rootfs=image.rootfs,
                             argv=argv, env=image_env + user_env + ([] if has_path else [DEFAULT_PATH]),
                             cwd=image.working_dir, limits=limits, enforcement=self.enforcement)  # fmt: skip
        self.out: _OutTmpfs | None = None
        self.process: asyncio.subprocess.Process | None = None

    @property
    def limits(self) -> Limits:
        return self.bundle.limits

    async def start(self, write_inputs: Callable[[Path], None] | None = None,
                    stream_limit: int = 2**16) -> asyncio.subprocess.Process:  # fmt: skip
        """Makes the bundle (`write_inputs(in_dir)` fills /in), mounts /out's tmpfs and starts the process, in a
        session of its own; on a failure or a cancellation on the way, what was made is torn down again."""
        bundle = self.bundle
        try:
            bundle.in_dir.mkdir(parents=True)
            bundle.out_dir.mkdir()
            bundle.dir.chmod(0o755)
            if write_inputs is not None:
                write_inputs(bundle.in_dir)
            self.out = await _OutTmpfs.mount(bundle.out_dir, self.limits.output_mb, self.tier.out_options,
                                             self.tier.out_userns)  # fmt: skip
            launch = self.tier.prepare(bundle)
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *self.out.enter, *launch.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, pass_fds=launch.pass_fds, preexec_fn=launch.preexec,
                    start_new_session=True, limit=stream_limit,
                )  # fmt: skip
            finally:
                for fd in launch.pass_fds:
                    os.close(fd)
        except BaseException:
            await asyncio.shield(self.teardown())
            raise
        return self.process

    @staticmethod
    def exit_code(process: asyncio.subprocess.Process) -> int:
        """The sandbox's exit code as a shell says it: bwrap killed by us reports -9; runc, like a shell, 128 + 9."""
        code = process.returncode
        return code if code >= 0 else 128 - code

    def hits(self, exit_code: int | None) -> set[str]:
        """The limits it ran into: a subset of {"memory", "pids", "cpu", "output"}."""
        hits = self.tier.hits(self.bundle, exit_code)
        if self.out is not None and exit_code is not None and self.out.full():
            hits.add("output")
        return hits

    def limit_reason(self, exit_code: int) -> str | None:
        """"out of memory (limit 256 MB)" when the process ended at a limit it hit; None when it hit none."""
        ending = Ending.of_hits(self.hits(exit_code))
        return ending.reason(self.limits) if ending else None

    async def kill(self) -> None:
        """Kills every process of it at once (SIGKILL), and waits for the sandbox's own to end."""
        if self.process is None or self.process.returncode is not None:
            return
        await self.tier.stop(self.bundle, self.process)
        try:
            await asyncio.wait_for(self.process.wait(), KILL_SECONDS)
        except asyncio.TimeoutError:
            raise SandboxFailed(f"sandbox: {self.bundle.id} did not end {KILL_SECONDS:g} s after its kill") from None

    async def teardown(self) -> None:
        """Removes the container, its cgroups, /out's tmpfs and the bundle's folder; what /out held is gone then."""
        await self.tier.teardown(self.bundle)
        if self.out is not None:
            await self.out.close()
        shutil.rmtree(self.bundle.dir, ignore_errors=True)


class Confinement:
    """Tier B's limits on a process kiln starts under the worker itself, in no namespace and from no image (an
    mcp_host command): memory, pids and CPU held by cgroups where this process may create them, else by rlimits
    (tiers.process_limits; `optional`, the limits nobody asked for, are left unheld where they cannot be held).
    `preexec()` is what its child runs before exec. A folder under the work dir, named like a container and empty,
    marks its cgroups, so that clean_leftovers finds them after a worker's kill -9."""

    def __init__(self, *, run_id: str, work_dir: Path, limits: Limits = Limits(), persistent: bool = True,
                 optional: frozenset[str] = frozenset()):  # fmt: skip
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", run_id):
            raise InvalidRequest(f"run_id: {run_id!r} is not 1-41 letters, digits, '_', '.' or '-'")
        self.limits = limits
        self.enforcement = process_limits(limits, can_limit(), persistent=persistent, sandboxed=False,
                                          optional=optional)  # fmt: skip
        self.id = f"{PREFIX}{run_id}-{secrets.token_hex(3)}"
        self.dir = Path(work_dir).resolve() / self.id
        self.cgroups = RunCgroups(self.id)

    def preexec(self) -> Callable[[], None]:
        """Makes its folder and cgroups; what the child runs before exec to join them and take its rlimits."""
        self.dir.mkdir(parents=True)
        return confine(self.cgroups, self.limits, self.enforcement)

    def hits(self, exit_code: int | None) -> set[str]:
        return process_hits(self.cgroups, self.enforcement, exit_code)

    def limit_reason(self, exit_code: int) -> str | None:
        """"out of memory (limit 256 MB)" when the process ended at a limit it hit; None when it hit none."""
        ending = Ending.of_hits(self.hits(exit_code))
        return ending.reason(self.limits) if ending else None

    async def kill(self) -> None:
        """Kills every process in its cgroups (a child that left the process's session included)."""
        for controller in ("pids", "memory", "cpu"):
            path = self.cgroups.dir(controller)
            if path is not None and path.is_dir():
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    async def teardown(self) -> None:
        await self.cgroups.remove()
        shutil.rmtree(self.dir, ignore_errors=True)


class PluginRun:
    """One run of a plugin image in the sandbox: `await run.run()` gives its Outcome; `run.cancel()` ends it.

    input is written as /in/input.json and given on stdin; files (name → bytes, or a file's path) appear under /in too.
    Stdout's lines go to on_stdout as they arrive. An asyncio cancellation of run() kills and cleans up the
    run before it propagates; cancel() makes run() return an Outcome whose ending is CANCELLED.
    """

    def __init__(self, image: ImageRef, *, run_id: str, work_dir: Path, results_dir: Path, limits: Limits = Limits(),
                 command: Sequence[str] | None = None, input: Any = None, files: Mapping[str, bytes | Path] | None = None,
                 env: Mapping[str, str] | None = None, on_stdout: Callable[[str], None] | None = None,
                 tier: str | None = None):  # fmt: skip
        for name in files or {}:
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == "input.json":
                raise InvalidRequest(f"files: {name!r} is not a relative path inside /in (input.json is taken)")
        self.sandbox = Sandbox(image, run_id=run_id, work_dir=work_dir, limits=limits, command=command, env=env,
                               tier=tier)  # fmt: skip
        self.results_dir = Path(results_dir)
        self.input = input
        self.files = dict(files or {})
        self.on_stdout = on_stdout
        self._cancelled = asyncio.Event()

    @property
    def bundle(self) -> Bundle:
        return self.sandbox.bundle

    @property
    def tier(self) -> Tier:
        return self.sandbox.tier

    @property
    def enforcement(self) -> dict[str, str]:
        return self.sandbox.enforcement

    def cancel(self) -> None:
        """Ends the run: its processes are killed at once and run() returns an Outcome CANCELLED."""
        self._cancelled.set()

    async def run(self) -> Outcome:
        """Runs the plugin once, to its ending; nothing of the run remains afterwards but the results folder."""
        sandbox, limits = self.sandbox, self.sandbox.limits
        started = time.monotonic()
        process = None
        try:
            process = await sandbox.start(self._write_inputs)
            stdout, stderr = _Tail(self.on_stdout), _Tail()
            streams = [asyncio.ensure_future(stdout.read(process.stdout)),
                       asyncio.ensure_future(stderr.read(process.stderr)),
                       asyncio.ensure_future(self._feed(process))]  # fmt: skip
            killed_for = await self._wait(process, started)
            await asyncio.wait(streams, timeout=KILL_SECONDS)
            for task in streams:
                task.cancel()
            exit_code = sandbox.exit_code(process)
            hit = Ending.of_hits(sandbox.hits(exit_code))
            self.results_dir.mkdir(parents=True, exist_ok=True)
            files = sandbox.out.copy_to(self.results_dir)
            if killed_for is Ending.CANCELLED:
                ending = killed_for
            else:  # a limit the run hit explains a kill at the deadline, and outranks its own exit code
                ending = hit or killed_for or (Ending.COMPLETED if exit_code == 0 else Ending.EXIT_CODE)
            reason = ending.reason(limits, exit_code)
            if ending is Ending.EXIT_CODE and stderr.text().strip():
                reason += ": " + stderr.text().strip()[-STDERR_IN_REASON:]
            return Outcome(ending=ending, reason=reason, exit_code=exit_code, stdout=stdout.text(),
                           stderr=stderr.text(), output=_output_json(self.results_dir, files), files=files,
                           seconds=time.monotonic() - started, tier=sandbox.tier.name,
                           enforcement=sandbox.enforcement)  # fmt: skip
        except asyncio.CancelledError:
            if process is not None and process.returncode is None:
                await asyncio.shield(sandbox.kill())
            raise
        finally:
            await asyncio.shield(sandbox.teardown())

    async def _wait(self, process: asyncio.subprocess.Process, started: float) -> Ending | None:
        """Waits for the sandbox to end by itself, or kills it on cancel(), at the deadline, or once a fork was
        refused by the pids limit (a plugin past it is a fork bomb or stuck); the ending it was killed for."""
        exited = asyncio.ensure_future(process.wait())
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        deadline = started + self.sandbox.limits.wall_seconds
        try:
            while True:
                timeout = max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
                await asyncio.wait({exited, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if exited.done():
                    return None
                if cancelled.done():
                    reason = Ending.CANCELLED
                elif "pids" in self.sandbox.hits(None):
                    reason = Ending.TOO_MANY_PROCESSES
                elif time.monotonic() >= deadline:
                    reason = Ending.WALL_TIME_LIMIT
                else:
                    continue
                await self.sandbox.kill()
                return reason
        finally:
            cancelled.cancel()

    async def _feed(self, process: asyncio.subprocess.Process) -> None:
        """input.json on stdin, then end of file; a plugin that does not read it is no error."""
        try:
            if self.input is not None:
                process.stdin.write(json.dumps(self.input).encode())
                await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _write_inputs(self, in_dir: Path) -> None:
        if self.input is not None:
            (in_dir / "input.json").write_text(json.dumps(self.input))
        for name, data in self.files.items():
            target = in_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                target.write_bytes(data)
            else:  # a stored file, read-only: a link costs nothing, and the run cannot change it
                try:
                    os.link(data, target)
                except OSError:
                    shutil.copyfile(data, target)


def _output_json(results_dir: Path, files: list[str]) -> Any:
    if "output.json" not in files:
        return None
    try:
        return json.loads((results_dir / "output.json").read_text())
    except (ValueError, UnicodeDecodeError):
        return None


async def clean_leftovers(work_dir: Path, run_id: str | None = None) -> list[str]:
    """Removes what a worker killed mid-run (kill -9) left under work_dir: its containers (by id prefix in
    `runc list`, bundle under work_dir), their cgroups wherever that worker's own cgroup was, and their
    bundle folders; only those of `run_id` when given. The ids it cleaned."""
    work_dir = Path(work_dir).resolve()
    prefix = f"{PREFIX}{run_id}-" if run_id else PREFIX
    bundles = work_dir.iterdir() if work_dir.is_dir() else []
    ids = {p.name for p in bundles if p.is_dir() and p.name.startswith(prefix)}
    if os.geteuid() == 0 and shutil.which("runc"):
        listing = subprocess.run(["runc", "list", "--format", "json"], capture_output=True, text=True)
        for container in json.loads(listing.stdout or "null") or []:
            if container["id"].startswith(prefix) and Path(container["bundle"]).is_relative_to(work_dir):
                subprocess.run(["runc", "delete", "--force", container["id"]], capture_output=True)
                ids.add(container["id"])
    for container_id in sorted(ids):
        await RunCgroups(container_id).remove(anywhere=True)
        shutil.rmtree(work_dir / container_id, ignore_errors=True)
    return sorted(ids)


async def claim_work_dir(root: Path, name: str) -> tuple[Path, BinaryIO, list[str]]:
    """A worker's own folder for its runs, root/<name>, locked while the returned lock file stays open (keep it
    for the worker's life). Before, the folders under root whose worker is gone (their lock is free) are
    cleaned with clean_leftovers and removed. (folder, lock file, ids cleaned)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cleaned = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name != name):
        with (folder / ".lock").open("ab") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live worker's
                continue
            cleaned += await clean_leftovers(folder)
            shutil.rmtree(folder, ignore_errors=True)
    folder = root / name
    folder.mkdir(exist_ok=True)
    lock = (folder / ".lock").open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SandboxFailed(f"sandbox: {folder} belongs to a live worker of the same name") from None
    cleaned += await clean_leftovers(folder)  # a predecessor of the same name
    return folder, lock, cleaned
