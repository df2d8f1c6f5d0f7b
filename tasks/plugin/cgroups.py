"""The cgroups of plugin runs: where this process's own are, a run's beneath them, its limits, what it hit, removal.

A run's cgroup is a child of the worker's own cgroup in each hierarchy (as runc places a relative
`cgroupsPath`), so a worker confined by its parent confines its plugins too. v1 (and the hybrid layout
here) is what this machine has; the v2 file names are the documented ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from kiln.tasks.plugin.limits import Limits

# the controllers that enforce Limits; the others runc also creates a cgroup in and removes
LIMITING = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and this process's cgroup in it."""

    controllers: frozenset[str]  # empty for a named v1 hierarchy (name=systemd); v2: those enabled below ours
    mount: Path
    own: Path
    version: int


def hierarchies() -> list[Hierarchy]:
    """Every cgroup hierarchy mounted here, with this process's directory in it."""
    mine = {}  # v1 controllers (or "" for v2) → our path, from /proc/self/cgroup
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        mine[names] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        fstype, _, options = tail.split(" ")[:3]
        root, mountpoint = fields.split(" ")[3:5]
        if fstype == "cgroup":
            tokens = set(options.split(","))
            names = next((n for n in mine if n and set(n.split(",")) <= tokens), None)
            controllers = frozenset(n for n in (names or "").split(",") if not n.startswith("name="))
            version = 1
        elif fstype == "cgroup2" and "" in mine:
            names, version, controllers = "", 2, frozenset()
        else:
            continue
        if names is None:
            continue
        own = Path(mountpoint) / os.path.relpath(mine[names], root)
        if version == 2:
            subtree = own / "cgroup.subtree_control"
            controllers = frozenset(subtree.read_text().split()) if subtree.exists() else frozenset()
        found.append(Hierarchy(controllers, Path(mountpoint), own, version))
    return found


def limiting_dirs() -> dict[str, Hierarchy]:
    """The hierarchy of each limiting controller available here: {"memory": …, "pids": …, "cpu": …}."""
    return {c: h for c in LIMITING for h in hierarchies() if c in h.controllers}


def can_limit() -> set[str]:
    """The limiting controllers under which this process may create a run's cgroup."""
    return {c for c, h in limiting_dirs().items() if os.access(h.own, os.W_OK | os.X_OK)}


class RunCgroups:
    """The cgroups of one run, named like its container, beneath this process's own (as they are at its start)."""

    def __init__(self, name: str):
        self.name = name
        self.hierarchies = hierarchies()
        self.limiting = {c: h for c in LIMITING for h in self.hierarchies if c in h.controllers}

    def dir(self, controller: str) -> Path | None:
        hierarchy = self.limiting.get(controller)
        return hierarchy.own / self.name if hierarchy else None

    def create(self, limits: Limits, controllers: set[str]) -> list[Path]:
        """Makes the run's cgroups of these controllers with their limits; the `cgroup.procs` files to join."""
        procs = []
        for controller in sorted(controllers):
            path, v2 = self.dir(controller), self.limiting[controller].version == 2
            path.mkdir(exist_ok=True)
            if controller == "memory":
                size = str(limits.memory_mb * 1024 * 1024)
                settings = {"memory.max": size, "memory.swap.max": "0"} if v2 else \
                    {"memory.limit_in_bytes": size, "memory.memsw.limit_in_bytes": size}  # fmt: skip
            elif controller == "pids":
                settings = {"pids.max": str(limits.pids)}
            else:
                quota = str(max(1000, round(limits.cpus * CFS_PERIOD_US)))
                settings = {"cpu.max": f"{quota} {CFS_PERIOD_US}"} if v2 else \
                    {"cpu.cfs_period_us": str(CFS_PERIOD_US), "cpu.cfs_quota_us": quota}  # fmt: skip
            for name, value in settings.items():
                if (path / name).exists():  # memsw is absent when the kernel does not account swap
                    (path / name).write_text(value)
            procs.append(path / "cgroup.procs")
        return procs

    def hits(self) -> set[str]:
        """The limits the run ran into: "memory" when the OOM killer killed in it, "pids" when a fork was refused."""
        hit = set()
        counters = {"memory": ("memory.oom_control", "memory.events", "oom_kill"),
                    "pids": ("pids.events", "pids.events", "max")}  # fmt: skip
        for controller, (v1_file, v2_file, key) in counters.items():
            path = self.dir(controller)
            if path is None:
                continue
            file = path / (v2_file if self.limiting[controller].version == 2 else v1_file)
            if file.exists():
                values = dict(line.split() for line in file.read_text().splitlines() if line.strip())
                if int(values.get(key, 0)):
                    hit.add(controller)
        return hit

    async def remove(self, anywhere: bool = False) -> list[Path]:
        """Kills what is left in the run's cgroups and removes them; `anywhere`: in the whole tree of each
        hierarchy, for a predecessor whose own cgroup was elsewhere. The directories removed."""
        removed = []
        for hierarchy in self.hierarchies:
            paths = [hierarchy.own / self.name] if not anywhere else \
                [Path(d) / self.name for d, names, _ in os.walk(hierarchy.mount) if self.name in names]  # fmt: skip
            for path in paths:
                if path.is_dir():
                    await _empty_and_remove(path)
                    removed.append(path)
        return removed


async def _empty_and_remove(path: Path, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except FileNotFoundError:  # removed meanwhile, by the runc that still ran the container
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY until the killed processes are gone
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.01)
