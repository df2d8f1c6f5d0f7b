"""The Python test image (tests/sandbox/python_image.py): cached by its inputs, a root filesystem the sandboxes can
mount on, and python3 from it running a real script under PluginRun in tier A and, as nobody, in tier B."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tarfile
import time

import pytest

from kiln.tasks.plugin import Ending, PluginRun, import_image
from kiln.tasks.plugin.images import MOUNT_POINTS
from tests.sandbox.busybox_image import write_layout
from tests.sandbox.conftest import SMALL, Forked
from tests.sandbox.oci_layout import TAR_GZIP
from tests.sandbox.python_image import (CELL_SUMMARY, ZNO, MirrorUnreachable, build_python_layout, cached_layout,
                                        check_cell_summary, python_image, python_layout, whole)  # noqa: F401

pyseccomp = pytest.importorskip("pyseccomp")  # loaded before the drop: nobody cannot read /root's interpreter files
LIMITS = SMALL.model_copy(update={"memory_mb": 128, "wall_seconds": 30})


@pytest.fixture(scope="module")
def python(base, python_layout):  # noqa: F811
    """The Python image, imported as the worker would."""
    return import_image(python_layout, base / "store")


def python_run(python, place, script: str, tier: str, lines: list[str], **options) -> PluginRun:
    return PluginRun(python, run_id=place.run_id, work_dir=place.work, results_dir=place.results, limits=LIMITS,
                     command=["python3", "-c", script], tier=tier, on_stdout=lines.append, **options)  # fmt: skip


def as_nobody(python, place, script: str, **options):
    """The tier B run's Outcome and stdout lines, run by a worker that is nobody."""

    def worker():
        lines = []
        return asyncio.run(python_run(python, place, script, "B", lines, **options).run()), lines

    return Forked(worker, nobody=True).result()


def test_a_cache_entry_is_used_until_it_is_broken(tmp_path):
    builds = []

    def build(layout):
        builds.append(layout)
        write_layout(layout)

    first = cached_layout("busybox", {"n": 1}, build, tmp_path)
    assert whole(first) and cached_layout("busybox", {"n": 1}, build, tmp_path) == first and len(builds) == 1
    assert cached_layout("busybox", {"n": 2}, build, tmp_path) != first and len(builds) == 2
    (layer,) = (p for p in (first / "blobs" / "sha256").iterdir() if p.stat().st_size > 1000)
    layer.write_bytes(layer.read_bytes()[:1000])  # cut off, as by a full disk
    assert not whole(first)
    assert cached_layout("busybox", {"n": 1}, build, tmp_path) == first and whole(first) and len(builds) == 3
    # a build killed midway leaves a hidden folder, and an entry without its index.json is not whole
    (tmp_path / f".{first.name}-killed").mkdir()
    (first / "index.json").unlink()
    assert cached_layout("busybox", {"n": 1}, build, tmp_path) == first and whole(first) and len(builds) == 4
    assert not list(tmp_path.glob(".*"))


def test_a_failed_build_leaves_nothing_in_the_cache(tmp_path):
    def build(layout):
        write_layout(layout)
        raise RuntimeError("mmdebstrap failed")

    with pytest.raises(RuntimeError, match="mmdebstrap failed"):
        cached_layout("busybox", {"n": 1}, build, tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_a_mirror_mmdebstrap_cannot_reach_is_named_for_the_skip(base, tmp_path):
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/debian"
    with pytest.raises(MirrorUnreachable) as unreachable:
        build_python_layout(tmp_path / "layout", mirror)
    assert str(unreachable.value).startswith(f"mmdebstrap cannot reach the Debian mirror {mirror}: Failed to fetch "
                                             f"{mirror}/dists/bookworm/InRelease  Could not connect")  # fmt: skip


def test_the_python_image_is_built_once_per_machine(python_layout):  # noqa: F811
    index = python_layout / "index.json"
    built = index.stat().st_mtime_ns
    started = time.monotonic()
    assert python_image() == python_layout
    assert time.monotonic() - started < 5  # a check of the cached blobs' digests; a build takes a minute
    assert index.stat().st_mtime_ns == built


def test_the_layer_has_the_mount_points_and_no_device_nodes(python_layout):  # noqa: F811
    def blob(digest: str):
        return python_layout / "blobs" / digest.replace(":", "/")

    (manifest,) = json.loads((python_layout / "index.json").read_text())["manifests"]
    (layer,) = json.loads(blob(manifest["digest"]).read_text())["layers"]
    assert layer["mediaType"] == TAR_GZIP
    with tarfile.open(blob(layer["digest"]), "r:gz") as layer:
        members = {m.name.removeprefix("./"): m for m in layer}
    for folder in MOUNT_POINTS:
        assert members[folder].isdir(), folder
    assert members["tmp"].mode == 0o1777
    assert [name for name in members if name.startswith("dev/")] == []
    assert members["usr/bin/python3"].issym() and "usr/lib/python3.11/json/__init__.py" in members
    assert not [name for name in members if name.startswith("usr/share/doc/") and not name.endswith("/")]


async def test_python_runs_the_cell_summary_in_tier_a(python, place):
    lines = []
    outcome = await python_run(python, place, CELL_SUMMARY, "A", lines, input=ZNO).run()
    assert (outcome.ending, outcome.tier, outcome.files) == (Ending.COMPLETED, "A", ["output.json", "sites.csv"])
    check_cell_summary(outcome.output, "\n".join(lines), (place.results / "sites.csv").read_text())
    assert outcome.stdout == "\n".join(lines) + "\n"
    print(f"tier A: python3 ran the cell summary in {outcome.seconds:.2f} s")


def test_python_runs_the_cell_summary_in_tier_b_as_nobody(python, place):
    outcome, lines = as_nobody(python, place, CELL_SUMMARY, input=ZNO)
    assert (outcome.ending, outcome.tier, outcome.files) == (Ending.COMPLETED, "B", ["output.json", "sites.csv"])
    check_cell_summary(outcome.output, "\n".join(lines), (place.results / "sites.csv").read_text())
    print(f"tier B: python3 ran the cell summary in {outcome.seconds:.2f} s")


async def test_python_runs_as_nobody_on_a_read_only_root_in_tier_a(python, place):
    lines = []
    script = "import os, sys; print(os.getuid(), os.getgid(), sys.version_info[:2], os.access('/usr', os.W_OK))"
    outcome = await python_run(python, place, script, "A", lines).run()
    assert outcome.ending is Ending.COMPLETED, outcome.reason
    assert lines == ["65534 65534 (3, 11) False"]
    assert os.geteuid() == 0  # the worker that ran it


def test_a_python_memory_hog_in_tier_b_without_cgroups_gets_memory_error(python, place):
    outcome, _ = as_nobody(python, place, "bytearray(300_000_000)")
    assert outcome.enforcement["memory_mb"] == "RLIMIT_AS per process"
    assert (outcome.ending, outcome.exit_code) == (Ending.EXIT_CODE, 1)
    assert outcome.reason.startswith("exited with code 1: Traceback") and outcome.reason.endswith("MemoryError")
