"""A worker killed with kill -9 mid-run: what it leaves, and clean_leftovers() at the next start removing all of it."""

from __future__ import annotations

import asyncio
import os
import select
import time

from kiln.tasks.plugin import clean_leftovers
from tests.sandbox.conftest import Forked, residue


def start_worker(image, place, tier: str) -> Forked:
    """A forked worker (as nobody for tier B) running a plugin that sleeps; returns once the plugin runs."""
    reader, writer = os.pipe()

    def worker():
        async def main():
            await place.run(image, "echo ready; sleep 60", tier=tier,
                            on_stdout=lambda line: os.write(writer, b"!")).run()  # fmt: skip

        asyncio.run(main())

    child = Forked(worker, nobody=tier == "B")
    os.close(writer)
    assert select.select([reader], [], [], 10)[0], "the plugin did not start"
    os.close(reader)
    return child


def settled(place, expected, seconds: float = 3.0) -> list[str]:
    """The residue once it stops changing into `expected` (killed processes take a moment to go)."""
    deadline = time.monotonic() + seconds
    while (left := residue(place.run_id, place.work)) != expected(left) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


async def test_tier_a_container_outlives_its_killed_worker_until_clean_leftovers(image, place):
    start_worker(image, place, "A").kill()
    left = residue(place.run_id, place.work)
    # runc keeps the container running without its worker: found by runc list, with its cgroups and bundle
    kinds = {entry.split()[0] for entry in left}
    assert {"container", "cgroup", "bundle", "process"} <= kinds, left
    assert not any(entry.startswith("mount") for entry in left)  # /out's tmpfs was never in the host's namespace
    (container,) = [entry.split()[1] for entry in left if entry.startswith("container")]
    assert await clean_leftovers(place.work) == [container]
    assert settled(place, lambda left: []) == []


def test_tier_b_sandbox_dies_with_its_killed_worker_and_clean_leftovers_removes_the_bundle(image, place):
    start_worker(image, place, "B").kill()
    # bwrap's --die-with-parent takes the sandbox down, and the /out holder ends with its stdin
    left = settled(place, lambda left: [e for e in left if e.startswith("bundle")])
    assert [entry.split()[0] for entry in left] == ["bundle"], left
    cleaned = Forked(lambda: asyncio.run(clean_leftovers(place.work)), nobody=True).result()
    assert cleaned == [os.path.basename(left[0].split()[1])]


async def test_clean_leftovers_leaves_other_work_dirs_alone(image, place, base):
    other = base / f"other-{place.run_id}"
    (other / "kiln-someone-else").mkdir(parents=True)
    try:
        assert await clean_leftovers(place.work) == []
        assert (other / "kiln-someone-else").is_dir()
    finally:
        (other / "kiln-someone-else").rmdir()
        other.rmdir()
