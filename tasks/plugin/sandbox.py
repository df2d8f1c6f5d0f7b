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
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Mapping, Sequence

from kiln.errors import InvalidRequest
from kiln.tasks.plugin.cgroups import RunCgroups
from kiln.tasks.plugin.images import ImageRef
from kiln.tasks.plugin.limits import Ending, Limits, SandboxFailed
from kiln.tasks.plugin.tiers import TIERS, Bundle, Tier, detect_tier

log = logging.getLogger(__name__)

PREFIX = "kiln-"
TAIL_BYTES = 64 * 1024
STDERR_IN_REASON = 500  # characters of stderr's end in an "exited with code N" reason
KILL_SECONDS = 2.0  # a killed sandbox is gone by then
POLL_SECONDS = 0.25  # how often a running sandbox's pids counter is read
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the limits a run hit, in the order their endings win when it hit several
HIT_ENDINGS = {"memory": Ending.OUT_OF_MEMORY, "pids": Ending.TOO_MANY_PROCESSES, "output": Ending.OUTPUT_TOO_LARGE,
               "cpu": Ending.CPU_TIME_LIMIT}  # fmt: skip
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
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", run_id):
            raise InvalidRequest(f"run_id: {run_id!r} is not 1-41 letters, digits, '_', '.' or '-'")
        argv = list(command) if command else image.argv
        if not argv:
            raise InvalidRequest("command: the image has no Entrypoint or Cmd; give a command")
        for name in files or {}:
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts or name == "input.json":
                raise InvalidRequest(f"files: {name!r} is not a relative path inside /in (input.json is taken)")
        if tier is None:
            check = detect_tier()
            if check.tier is None:
                raise SandboxFailed(f"sandbox: this worker offers no sandbox tier ({'; '.join(check.notes)})")
            tier = check.tier
        self.tier: Tier = TIERS[tier]
        self.enforcement = self.tier.enforcement(limits)  # refuses before anything starts
        image_env = [v for v in image.env if not any(v.startswith(f"{k}=") for k in env or {})]
        user_env = [f"{k}={v}" for k, v in (env or {}).items()]
        has_path = any(v.startswith("PATH=") for v in image_env + user_env)
        container_id = f"{PREFIX}{run_id}-{secrets.token_hex(3)}"
        self.bundle = Bundle(id=container_id, dir=Path(work_dir).resolve() / container_id, rootfs=image.rootfs,
                             argv=argv, env=image_env + user_env + ([] if has_path else [DEFAULT_PATH]),
                             cwd=image.working_dir, limits=limits, enforcement=self.enforcement)  # fmt: skip
        self.results_dir = Path(results_dir)
        self.input = input
        self.files = dict(files or {})
        self.on_stdout = on_stdout
        self._cancelled = asyncio.Event()

    def cancel(self) -> None:
        """Ends the run: its processes are killed at once and run() returns an Outcome CANCELLED."""
        self._cancelled.set()

    async def run(self) -> Outcome:
        """Runs the plugin once, to its ending; nothing of the run remains afterwards but the results folder."""
        bundle, tier, limits = self.bundle, self.tier, self.bundle.limits
        started = time.monotonic()
        out = process = None
        try:
            self._write_inputs()
            out = await _OutTmpfs.mount(bundle.out_dir, limits.output_mb, tier.out_options, tier.out_userns)
            launch = tier.prepare(bundle)
            try:
                process = await asyncio.create_subprocess_exec(
                    *out.enter, *launch.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, pass_fds=launch.pass_fds, preexec_fn=launch.preexec,
                    start_new_session=True,
                )  # fmt: skip
            finally:
                for fd in launch.pass_fds:
                    os.close(fd)
            stdout, stderr = _Tail(self.on_stdout), _Tail()
            streams = [asyncio.ensure_future(stdout.read(process.stdout)),
                       asyncio.ensure_future(stderr.read(process.stderr)),
                       asyncio.ensure_future(self._feed(process))]  # fmt: skip
            killed_for = await self._wait(process, started)
            await asyncio.wait(streams, timeout=KILL_SECONDS)
            for task in streams:
                task.cancel()
            # bwrap killed by us reports -9; runc, like a shell, 128 + 9
            exit_code = process.returncode if process.returncode >= 0 else 128 - process.returncode
            hits = tier.hits(bundle, exit_code)
            if out.full():
                hits.add("output")
            self.results_dir.mkdir(parents=True, exist_ok=True)
            files = out.copy_to(self.results_dir)
            if killed_for is Ending.CANCELLED:
                ending = killed_for
            else:  # a limit the run hit explains a kill at the deadline, and outranks its own exit code
                hit = next((HIT_ENDINGS[h] for h in HIT_ENDINGS if h in hits), None)
                ending = hit or killed_for or (Ending.COMPLETED if exit_code == 0 else Ending.EXIT_CODE)
            reason = ending.reason(limits, exit_code)
            if ending is Ending.EXIT_CODE and stderr.text().strip():
                reason += ": " + stderr.text().strip()[-STDERR_IN_REASON:]
            return Outcome(ending=ending, reason=reason, exit_code=exit_code, stdout=stdout.text(),
                           stderr=stderr.text(), output=_output_json(self.results_dir, files), files=files,
                           seconds=time.monotonic() - started, tier=tier.name,
                           enforcement=self.enforcement)  # fmt: skip
        except asyncio.CancelledError:
            if process is not None and process.returncode is None:
                await asyncio.shield(self._kill(process))
            raise
        finally:
            await asyncio.shield(self._teardown(out))

    async def _wait(self, process: asyncio.subprocess.Process, started: float) -> Ending | None:
        """Waits for the sandbox to end by itself, or kills it on cancel(), at the deadline, or once a fork was
        refused by the pids limit (a plugin past it is a fork bomb or stuck); the ending it was killed for."""
        exited = asyncio.ensure_future(process.wait())
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        deadline = started + self.bundle.limits.wall_seconds
        try:
            while True:
                timeout = max(0.0, min(POLL_SECONDS, deadline - time.monotonic()))
                await asyncio.wait({exited, cancelled}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if exited.done():
                    return None
                if cancelled.done():
                    reason = Ending.CANCELLED
                elif "pids" in self.tier.hits(self.bundle, None):
                    reason = Ending.TOO_MANY_PROCESSES
                elif time.monotonic() >= deadline:
                    reason = Ending.WALL_TIME_LIMIT
                else:
                    continue
                await self._kill(process)
                return reason
        finally:
            cancelled.cancel()

    async def _kill(self, process: asyncio.subprocess.Process) -> None:
        await self.tier.stop(self.bundle, process)
        try:
            await asyncio.wait_for(process.wait(), KILL_SECONDS)
        except asyncio.TimeoutError:
            raise SandboxFailed(f"sandbox: {self.bundle.id} did not end {KILL_SECONDS:g} s after its kill") from None

    async def _feed(self, process: asyncio.subprocess.Process) -> None:
        """input.json on stdin, then end of file; a plugin that does not read it is no error."""
        try:
            if self.input is not None:
                process.stdin.write(json.dumps(self.input).encode())
                await process.stdin.drain()
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _write_inputs(self) -> None:
        self.bundle.in_dir.mkdir(parents=True)
        self.bundle.out_dir.mkdir()
        self.bundle.dir.chmod(0o755)
        if self.input is not None:
            (self.bundle.in_dir / "input.json").write_text(json.dumps(self.input))
        for name, data in self.files.items():
            target = self.bundle.in_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                target.write_bytes(data)
            else:  # a stored file, read-only: a link costs nothing, and the run cannot change it
                try:
                    os.link(data, target)
                except OSError:
                    shutil.copyfile(data, target)

    async def _teardown(self, out: _OutTmpfs | None) -> None:
        await self.tier.teardown(self.bundle)
        if out is not None:
            await out.close()
        shutil.rmtree(self.bundle.dir, ignore_errors=True)


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
