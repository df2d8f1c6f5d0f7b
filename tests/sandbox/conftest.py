"""Fixtures of the sandbox tests: the Debian tools, a busybox image, a place per test, and the residue check after it.

These tests run real runc and bwrap as root (Tier A) and, dropped to nobody in a forked child, unprivileged
(Tier B). After every test nothing of its runs may be left: no `runc list` entry, cgroup, mount, process or
bundle folder.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from kiln.tasks.plugin import Limits, PluginRun, import_image
from kiln.tasks.plugin.cgroups import hierarchies
from tests.sandbox.busybox_image import write_layout

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
SMALL = Limits(cpus=1, memory_mb=64, pids=32, wall_seconds=10, output_mb=1, tmp_mb=4)
_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def base() -> Path:
    """A folder every test's runs live under, open to nobody (pytest's own tmp folders are root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("the sandbox tests run as root: tier A needs it, and tier B tests drop to nobody themselves")
    subprocess.run([str(ROOT / "scripts" / "sandbox-deps.sh")], check=True)
    path = Path(tempfile.mkdtemp(prefix="kiln-sandbox-tests-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def image(base):
    """The busybox image, written as an OCI layout and imported."""
    return import_image(write_layout(base / "layout"), base / "store")


@dataclass
class Place:
    """Where one test's runs live: the run id its containers are named by, a work dir and a results dir."""

    run_id: str
    work: Path
    results: Path

    def run(self, image, command: str, *, limits: Limits = SMALL, tier: str = "A", **options) -> PluginRun:
        return PluginRun(image, run_id=self.run_id, work_dir=self.work, results_dir=self.results, limits=limits,
                         command=["sh", "-c", command], tier=tier, **options)  # fmt: skip


@pytest.fixture
def place(base) -> Place:
    """A fresh place for the test's runs; afterwards none of them may have left anything behind."""
    run_id = f"t{next(_numbers)}{os.getpid()}"
    folder = base / run_id
    for sub in ("work", "results"):
        (folder / sub).mkdir(parents=True)
    shutil.chown(folder / "work", NOBODY, NOBODY)
    shutil.chown(folder / "results", NOBODY, NOBODY)
    yield Place(run_id, folder / "work", folder / "results")
    assert residue(run_id, folder / "work") == []


def residue(run_id: str, work: Path) -> list[str]:
    """What the runs named `run_id` left under `work`: containers, cgroups, mounts, processes, bundle folders."""
    prefix = f"kiln-{run_id}-"
    left = []
    listing = subprocess.run(["runc", "list", "--format", "json"], capture_output=True, text=True, check=True)
    left += [f"container {c['id']}" for c in json.loads(listing.stdout or "null") or [] if c["id"].startswith(prefix)]
    for hierarchy in hierarchies():
        for folder, names, _ in os.walk(hierarchy.mount):
            left += [f"cgroup {folder}/{name}" for name in names if name.startswith(prefix)]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    left += [f"mount {m}" for m in mounts if m.startswith(str(work.parent))]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmdline or prefix in cmdline:
            left.append(f"process {pid}: {cmdline[:120]}")
    # its bundle folders, in `work` or in a worker's folder there (a job's)
    left += [f"bundle {p}" for p in (*work.glob(f"kiln-{run_id}*"), *work.glob(f"*/kiln-{run_id}*"))]
    return left


def drop_to_nobody() -> None:
    """This (forked) process becomes nobody, as an unprivileged worker is; /proc stays readable to it."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: setuid cleared it


class Forked:
    """A function run in a forked child, as nobody when asked (like `setpriv`: the interpreter here lives under
    /root, which nobody cannot read, so it cannot be started anew as nobody). Its result comes back pickled."""

    def __init__(self, function: Callable[[], Any], *, nobody: bool, before: Callable[[], None] | None = None):
        reader, writer = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(reader)
            try:
                if before:
                    before()
                if nobody:
                    drop_to_nobody()
                answer = ("ok", function())
            except BaseException as error:  # noqa: BLE001 - everything goes back to the test
                answer = ("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")
            with os.fdopen(writer, "wb") as out:
                pickle.dump(answer, out)
            os._exit(0)
        os.close(writer)
        self.reader = reader

    def result(self) -> Any:
        with os.fdopen(self.reader, "rb") as answer:
            kind, value = pickle.load(answer)
        os.waitpid(self.pid, 0)
        if kind == "error":
            raise AssertionError(f"in the forked child: {value}")
        return value

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.reader)
