"""The two sandbox tiers over one unpacked image: runc with cgroups (A, root) and bwrap with rlimits (B, unprivileged).

A tier says how it enforces each limit (or refuses), how it starts a bundle, stops it, reads which limits
it hit, and removes what it made. The rest of a run (input, output, time, reasons) is sandbox.py's.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
import json
import math
import os
import resource
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.tasks.plugin import seccomp
from kiln.tasks.plugin.cgroups import LIMITING, RunCgroups, can_limit
from kiln.tasks.plugin.limits import Limits, LimitUnenforceable, SandboxFailed

NOBODY = 65534
# runc's default masked and read-only /proc paths (`runc spec`)
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"]  # fmt: skip
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
LIMIT_OF_CONTROLLER = {"memory": "memory_mb", "pids": "pids", "cpu": "cpus"}


@dataclass
class Bundle:
    """What one run starts from: its container id and folder under the work dir, the image's root, the process."""

    id: str  # kiln-<run id>-<random>; also the name of its cgroups
    dir: Path
    rootfs: Path
    argv: list[str]
    env: list[str]
    cwd: str
    limits: Limits
    enforcement: dict[str, str] = field(default_factory=dict)  # limit → how the tier enforces it
    cgroups: RunCgroups = field(init=False)

    def __post_init__(self) -> None:
        self.cgroups = RunCgroups(self.id)

    @property
    def in_dir(self) -> Path:
        return self.dir / "in"

    @property
    def out_dir(self) -> Path:
        return self.dir / "out"


@dataclass
class Launch:
    """How to start a prepared bundle: its command and what the child does before exec."""

    argv: list[str]
    pass_fds: tuple[int, ...] = ()
    preexec: Callable[[], None] | None = None


class Tier(ABC):
    """A way to sandbox a plugin; subclasses (RuncTier, BwrapTier) set the class attributes and the steps."""

    name: str
    # the namespace that holds /out's tmpfs needs a user namespace of its own to mount as an unprivileged user
    out_userns: bool
    out_options: str  # tmpfs options of /out besides its size

    @abstractmethod
    def enforcement(self, limits: Limits, *, persistent: bool = False) -> dict[str, str]:
        """How each limit is enforced here; raises LimitUnenforceable for one that cannot be. `persistent`: a server
        that runs until it is stopped, which has no wall time (and no limit may be derived from one)."""

    @abstractmethod
    def prepare(self, bundle: Bundle) -> Launch:
        """The bundle's config and how to start it."""

    @abstractmethod
    async def stop(self, bundle: Bundle, process: asyncio.subprocess.Process) -> None:
        """Kills every process of the run at once (SIGKILL: a plugin that ignores SIGTERM stops too)."""

    def hits(self, bundle: Bundle, exit_code: int) -> set[str]:
        """The limits the run ran into: a subset of {"memory", "pids", "cpu"}."""
        return bundle.cgroups.hits()

    async def teardown(self, bundle: Bundle) -> None:
        await bundle.cgroups.remove()


class RuncTier(Tier):
    """Tier A: runc runs the bundle with an OCI config kiln writes; its cgroups (v1 or v2) hold every limit."""

    name = "A"
    out_userns = False
    out_options = f"uid={NOBODY},gid={NOBODY},mode=0755,nosuid,nodev"

    def enforcement(self, limits: Limits, *, persistent: bool = False) -> dict[str, str]:
        if os.geteuid() != 0:
            raise SandboxFailed("sandbox: tier A runs runc, which needs root on this worker")
        missing = set(LIMITING) - can_limit()
        if missing:
            controller = sorted(missing)[0]
            raise LimitUnenforceable(LIMIT_OF_CONTROLLER[controller], self.name,
                                     f"no writable {controller} cgroup")  # fmt: skip
        how = {"memory_mb": "memory cgroup (swap included)", "pids": "pids cgroup", "cpus": "cpu cgroup quota",
               "output_mb": "tmpfs size", "tmp_mb": "tmpfs size"}  # fmt: skip
        return how if persistent else {**how, "wall_seconds": "kill at the deadline"}

    def prepare(self, bundle: Bundle) -> Launch:
        (bundle.dir / "config.json").write_text(json.dumps(oci_config(bundle), indent=1))
        # --keep: the stopped container keeps its cgroups until `runc delete`, so hits() can read their counters
        return Launch(["runc", "run", "--keep", "--bundle", str(bundle.dir), bundle.id])

    async def stop(self, bundle: Bundle, process: asyncio.subprocess.Process) -> None:
        # the plugin is the init of its pid namespace: when it dies the kernel kills the rest
        if await _quiet("runc", "kill", bundle.id, "KILL") != 0:  # not created yet, or already gone
            _kill_group(process)

    async def teardown(self, bundle: Bundle) -> None:
        await _quiet("runc", "delete", "--force", bundle.id)
        await super().teardown(bundle)


def oci_config(bundle: Bundle) -> dict:
    """The OCI runtime config of a Tier A run: read-only root, uid 65534, no capabilities, seccomp, no network
    but loopback, its own pid/ipc/uts/mount/cgroup namespaces, size-limited tmpfs, and its cgroup limits."""
    limits = bundle.limits
    memory = limits.memory_mb * 1024 * 1024
    tmpfs = ["nosuid", "nodev", f"size={limits.tmp_mb}m", "mode=1777"]
    return {
        "ociVersion": "1.0.2",
        "root": {"path": str(bundle.rootfs), "readonly": True},
        "hostname": "kiln",
        "process": {
            "terminal": False,
            "user": {"uid": NOBODY, "gid": NOBODY, "additionalGids": []},
            "args": bundle.argv,
            "env": bundle.env,
            "cwd": bundle.cwd,
            "capabilities": {kind: [] for kind in ("bounding", "effective", "inheritable", "permitted", "ambient")},
            "noNewPrivileges": True,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                        {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],  # fmt: skip
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": tmpfs},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmpfs},
            {"destination": "/in", "type": "bind", "source": str(bundle.in_dir),
             "options": ["rbind", "ro", "nosuid", "nodev"]},
            # the tmpfs mounted on out/ in the namespace runc is started in (sandbox.py)
            {"destination": "/out", "type": "bind", "source": str(bundle.out_dir),
             "options": ["rbind", "nosuid", "nodev"]},
        ],  # fmt: skip
        "linux": {
            # relative: beneath the worker's own cgroup in each hierarchy
            "cgroupsPath": bundle.id,
            "resources": {
                "memory": {"limit": memory, "swap": memory},  # v1 memsw: memory plus swap, so no swap
                "pids": {"limit": limits.pids},
                "cpu": {"quota": max(1000, round(limits.cpus * 100_000)), "period": 100_000},
                "devices": [{"allow": False, "access": "rwm"}],
            },
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": seccomp.oci_profile(),
        },
    }


class BwrapTier(Tier):
    """Tier B: bwrap over the same root, unprivileged, its process tree held to its limits by `confine`."""

    name = "B"
    out_userns = True
    out_options = "mode=0755,nosuid,nodev"
    # bwrap's own two processes, counted with the plugin's by its cgroup or RLIMIT_NPROC (the outer one, pid 1)
    BWRAP_PROCESSES = 2

    def enforcement(self, limits: Limits, *, persistent: bool = False) -> dict[str, str]:
        how = {**process_limits(limits, can_limit(), persistent=persistent), "output_mb": "tmpfs size",
               "tmp_mb": "tmpfs size"}  # fmt: skip
        return how if persistent else {**how, "wall_seconds": "kill at the deadline"}

    def prepare(self, bundle: Bundle) -> Launch:
        limits = bundle.limits
        filter_fd = os.open(seccomp.write_bpf(bundle.dir / "seccomp.bpf"), os.O_RDONLY)
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "kiln",
                "--ro-bind", str(bundle.rootfs), "/", "--proc", "/proc", "--dev", "/dev",
                "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp",
                "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", "/dev/shm",
                "--ro-bind", str(bundle.in_dir), "/in", "--bind", str(bundle.out_dir), "/out",
                "--chdir", bundle.cwd, "--clearenv"]  # fmt: skip
        for variable in bundle.env:
            name, _, value = variable.partition("=")
            argv += ["--setenv", name, value]
        argv += ["--seccomp", str(filter_fd), "--", *bundle.argv]
        preexec = confine(bundle.cgroups, limits, bundle.enforcement, extra_pids=self.BWRAP_PROCESSES)
        return Launch(argv, pass_fds=(filter_fd,), preexec=preexec)

    async def stop(self, bundle: Bundle, process: asyncio.subprocess.Process) -> None:
        # bwrap dies; --die-with-parent kills its pid 1, and the kernel the rest of the pid namespace
        _kill_group(process)

    def hits(self, bundle: Bundle, exit_code: int) -> set[str]:
        return process_hits(bundle.cgroups, bundle.enforcement, exit_code)


def cpu_seconds(limits: Limits) -> int:
    """RLIMIT_CPU's seconds for a run without a cpu cgroup: what the quota would allow over its wall time."""
    return math.ceil(limits.cpus * limits.wall_seconds)


def process_limits(limits: Limits, cgroups: set[str], *, persistent: bool = False, sandboxed: bool = True,
                   optional: frozenset[str] = frozenset()) -> dict[str, str]:  # fmt: skip
    """How tier B holds a process tree to memory_mb, pids and cpus: by the cgroup of each where this process may
    create one (`cgroups`, of LIMITING), else by rlimits, which bind each process, not the tree: RLIMIT_AS caps
    each process's address space at memory_mb, RLIMIT_NPROC the processes of the sandbox's user, and RLIMIT_CPU
    each process's CPU seconds at cpus × wall_seconds (what the quota would allow). Where they hold, a process that
    hits memory or pids sees failed allocations or forks and ends by its own exit code; SIGXCPU names the CPU limit.

    A `persistent` process (a server, running until it is stopped) has no wall time: its CPU limit needs the
    cgroup's quota. A process not `sandboxed` (a command under the worker) runs as the worker's user, whose other
    processes RLIMIT_NPROC would count too: its pids limit needs the cgroup. What cannot be held is refused
    (LimitUnenforceable), unless it is `optional` (a default nobody asked for): then it is said to be unheld."""
    how: dict[str, str] = {}

    def cannot(limit: str, why: str) -> None:
        if limit not in optional:
            remedy = "run it on a worker that offers tier A" if sandboxed else \
                "run it on a worker that may create cgroups (root, or a delegated cgroup), or leave the limit out"
            raise LimitUnenforceable(limit, BwrapTier.name, why, remedy)
        how[limit] = f"not held: {why}"

    how["memory_mb"] = "memory cgroup (swap included)" if "memory" in cgroups else "RLIMIT_AS per process"
    if "cpu" in cgroups:
        how["cpus"] = "cpu cgroup quota"
    elif persistent:
        cannot("cpus", "no writable cpu cgroup, and a server runs until it is stopped: RLIMIT_CPU would end it after "
                       "some CPU seconds, not hold it to a share of a core")  # fmt: skip
    else:
        how["cpus"] = f"RLIMIT_CPU {cpu_seconds(limits)} s per process"
    if "pids" in cgroups:
        how["pids"] = "pids cgroup"
    elif os.geteuid() == 0:
        cannot("pids", "no writable pids cgroup, and RLIMIT_NPROC does not bind root")
    elif not sandboxed:
        cannot("pids", "no writable pids cgroup, and RLIMIT_NPROC would count the worker's own processes too")
    else:
        how["pids"] = "RLIMIT_NPROC of the sandbox's user"
    return how


def confine(cgroups: RunCgroups, limits: Limits, enforcement: dict[str, str], *,
            extra_pids: int = 0) -> Callable[[], None]:  # fmt: skip
    """Creates the cgroups `enforcement` (process_limits) names, with the limits (pids raised by `extra_pids`, the
    processes of the sandbox's own around the program); what the child runs before exec: it joins them and sets
    the rlimits enforcement names, so nothing it starts escapes either."""
    controllers = {c for c in LIMITING if "cgroup" in enforcement[LIMIT_OF_CONTROLLER[c]]}
    with_extra = limits.model_copy(update={"pids": limits.pids + extra_pids})
    procs = cgroups.create(with_extra, controllers)
    rlimits = []
    if "RLIMIT_AS" in enforcement["memory_mb"]:
        rlimits.append((resource.RLIMIT_AS, limits.memory_mb * 1024 * 1024))
    if "RLIMIT_NPROC" in enforcement["pids"]:
        rlimits.append((resource.RLIMIT_NPROC, with_extra.pids))
    if "RLIMIT_CPU" in enforcement["cpus"]:
        seconds = cpu_seconds(limits)
        rlimits.append((resource.RLIMIT_CPU, (seconds, seconds + 1)))  # SIGXCPU first, SIGKILL a second later

    def preexec() -> None:  # in the child, before exec
        for path in procs:
            path.write_text(str(os.getpid()))
        for kind, value in rlimits:
            resource.setrlimit(kind, value if isinstance(value, tuple) else (value, value))

    return preexec


def process_hits(cgroups: RunCgroups, enforcement: dict[str, str], exit_code: int | None) -> set[str]:
    """The limits a confined process tree ran into: its cgroups' counters, and SIGXCPU where RLIMIT_CPU holds."""
    hit = cgroups.hits()
    if "RLIMIT_CPU" in enforcement.get("cpus", "") and exit_code == 128 + signal.SIGXCPU:
        hit.add("cpu")
    return hit


TIERS = {tier.name: tier for tier in (RuncTier(), BwrapTier())}


def _kill_group(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _quiet(*argv: str) -> int:
    """Runs a tool, its output discarded; its exit code."""
    process = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return await process.wait()


@dataclass(frozen=True)
class TierCheck:
    """The tiers this process can offer, best first, and why not the others."""

    tiers: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def tier(self) -> str | None:
        """The best tier, what a run gets when it asks for none; None when there is no sandbox here."""
        return self.tiers[0] if self.tiers else None


def detect_tier() -> TierCheck:
    """Which tiers this process can offer: A with root, runc and writable memory/pids/cpu cgroups; B when a bwrap
    sandbox starts as uid 65534 without capabilities. For /healthz and the worker's heartbeat."""
    tiers, notes = [], []
    missing_tools = [tool for tool in ("runc", "unshare", "nsenter") if shutil.which(tool) is None]
    if os.geteuid() != 0:
        notes.append("tier A: not root")
    elif missing_tools:
        notes.append(f"tier A: {', '.join(missing_tools)} not installed")
    elif set(LIMITING) - can_limit():
        notes.append(f"tier A: no writable {', '.join(sorted(set(LIMITING) - can_limit()))} cgroup")
    else:
        tiers.append("A")
    if shutil.which("bwrap") is None:
        notes.append("tier B: bwrap not installed")
    else:
        probe = subprocess.run(["bwrap", "--unshare-all", "--uid", str(NOBODY), "--gid", str(NOBODY), "--ro-bind", "/",
                                "/", "--cap-drop", "ALL", "true"], capture_output=True, text=True)  # fmt: skip
        if probe.returncode == 0:
            tiers.append("B")
        else:
            notes.append(f"tier B: bwrap cannot make a sandbox here ({probe.stderr.strip()})")
    return TierCheck(tuple(tiers), tuple(notes))
