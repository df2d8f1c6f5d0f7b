"""Tier B: bwrap as nobody (a forked child of the test, dropped to uid 65534), with rlimits, or with cgroups an
administrator delegated; the same isolation as tier A, and a refusal where a limit cannot be enforced."""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import socket

import pytest

from kiln.tasks.plugin import Ending, LimitUnenforceable, SandboxFailed, detect_tier
from kiln.tasks.plugin.cgroups import LIMITING, limiting_dirs
from tests.sandbox.conftest import NOBODY, SMALL, Forked

pyseccomp = pytest.importorskip("pyseccomp")  # loaded before the drop: nobody cannot read /root's interpreter files


def as_nobody(image, place, command, *, limits=SMALL, cancel_after=None, before=None, **options):
    """The run's Outcome and its stdout lines, run by a worker that is nobody."""

    def worker():
        lines = []

        async def main():
            run = place.run(image, command, limits=limits, tier="B", on_stdout=lines.append, **options)
            if cancel_after is not None:
                asyncio.get_running_loop().call_later(cancel_after, run.cancel)
            return await run.run()

        return asyncio.run(main()), lines

    return Forked(worker, nobody=True, before=before).result()


def test_nobody_is_offered_tier_b(base):
    check = Forked(detect_tier, nobody=True).result()
    assert (check.tier, check.notes) == ("B", ("tier A: not root",))


def test_tier_a_is_refused_to_nobody(image, place):
    def start():
        place.run(image, "true", tier="A")

    with pytest.raises(AssertionError, match="SandboxFailed: sandbox: tier A runs runc, which needs root"):
        Forked(start, nobody=True).result()
    assert SandboxFailed.status_code == 500


def test_hello_world_as_nobody(image, place):
    outcome, lines = as_nobody(
        image, place,
        'read -r line; echo "stdin: $line"; echo "in: $(cat /in/input.json)"; id -u; '
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status | tr '\\t' ' '; "
        'echo "{\\"ok\\": true}" > /out/output.json; echo x > /out/notes.txt',
        input={"a": 1},
    )  # fmt: skip
    assert (outcome.ending, outcome.tier) == (Ending.COMPLETED, "B")
    assert lines == ['stdin: {"a": 1}', 'in: {"a": 1}', "65534", "CapEff: 0000000000000000", "NoNewPrivs: 1",
                     "Seccomp: 2"]  # fmt: skip
    assert (outcome.output, outcome.files) == ({"ok": True}, ["notes.txt", "output.json"])
    assert outcome.enforcement["memory_mb"] == "RLIMIT_AS per process"
    assert outcome.enforcement["cpus"] == "RLIMIT_CPU 10 s per process"


def test_a_cpu_spin_ends_at_its_cpu_time(image, place):
    # a quarter core for 8 s: RLIMIT_CPU of 2 s per process, reached well before the wall time even on a busy machine
    outcome, _ = as_nobody(image, place, "while :; do :; done",
                           limits=SMALL.model_copy(update={"cpus": 0.25, "wall_seconds": 8}))  # fmt: skip
    assert (outcome.ending, outcome.reason, outcome.exit_code) == (Ending.CPU_TIME_LIMIT, "cpu time limit", 152)
    assert outcome.enforcement["cpus"] == "RLIMIT_CPU 2 s per process"
    assert outcome.seconds < 8


def test_a_sleeper_ends_at_the_wall_time(image, place):
    outcome, _ = as_nobody(image, place, "sleep 30", limits=SMALL.model_copy(update={"wall_seconds": 1}))
    assert (outcome.ending, outcome.reason) == (Ending.WALL_TIME_LIMIT, "wall time limit (1 s)")


def test_writing_past_output_mb_ends_output_too_large(image, place):
    outcome, _ = as_nobody(image, place, "head -c 5000000 /dev/zero > /out/big.bin")
    assert (outcome.ending, outcome.reason) == (Ending.OUTPUT_TOO_LARGE, "output larger than 1 MB")
    assert outcome.files == ["big.bin"]


def test_memory_past_the_address_space_limit_fails_inside(image, place):
    outcome, _ = as_nobody(image, place, "head -c 300000000 /dev/zero | tail")
    assert (outcome.ending, outcome.reason) == (Ending.EXIT_CODE, "exited with code 1: tail: out of memory")


def test_processes_stop_at_the_pids_limit(image, place):
    # the forks past the limit fail; the shell counts what lives in its pid namespace (bwrap's pid 1 included)
    outcome, lines = as_nobody(image, place, "(for i in $(seq 100); do sleep 30 & done) 2>/dev/null; "
                                             "set -- /proc/[0-9]*; echo $#")  # fmt: skip
    assert outcome.ending is Ending.COMPLETED
    assert 16 <= int(lines[0]) <= SMALL.pids


def test_isolation_as_nobody(image, place):
    secret = place.work.parent / "secret.txt"
    secret.write_text("host secret")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        outcome, lines = as_nobody(
            image, place,
            f"cat {secret} /etc/shadow; echo hi | nc -w 2 127.0.0.1 {listener.getsockname()[1]} && echo CONNECTED; "
            "for f in /x /etc/x /in/x /tmp/x /out/x; do touch $f 2>/dev/null && echo ok $f; done; "
            # busybox's mount refuses by itself (not root); unshare and chroot reach the kernel
            "mount -t tmpfs none /tmp && echo MOUNTED; unshare -r true && echo UNSHARED; "
            "chroot / true && echo CHROOTED",
        )  # fmt: skip
        with pytest.raises(TimeoutError):
            listener.accept()
    assert lines == ["root:image-shadow:1::::::", "ok /tmp/x", "ok /out/x"]
    for refusal in ("nc: can't connect", "mount: permission denied", "unshare(0x10000000): Operation not permitted",
                    "chroot: can't change root directory to '/': Operation not permitted"):
        assert refusal in outcome.stderr


def test_cancel_kills_a_plugin_that_ignores_sigterm_within_2_s(image, place):
    outcome, _ = as_nobody(image, place, "trap '' TERM INT; while :; do sleep 1; done", cancel_after=0.5)
    assert (outcome.ending, outcome.reason) == (Ending.CANCELLED, "cancelled")
    assert outcome.seconds < 2.5


@pytest.fixture
def delegated(place):
    """cgroups an administrator gave the worker's user (memory, pids, cpu), and the child joins them as root
    before it becomes nobody, as systemd's Delegate=yes would place it."""
    name = f"delegated-{place.run_id}"
    folders = [limiting_dirs()[c].own / name for c in LIMITING]

    def join():
        for folder in folders:
            folder.mkdir()
            for path in (folder, folder / "cgroup.procs", folder / "tasks"):
                os.chown(path, NOBODY, NOBODY)
            (folder / "cgroup.procs").write_text(str(os.getpid()))

    yield join
    for folder in folders:
        assert [p.name for p in folder.iterdir() if p.is_dir()] == []  # the run removed its own cgroup in it
        folder.rmdir()


def test_delegated_cgroups_name_out_of_memory(image, place, delegated):
    outcome, _ = as_nobody(image, place, "head -c 300000000 /dev/zero | tail", before=delegated)
    assert outcome.enforcement["memory_mb"] == "memory cgroup (swap included)"
    assert (outcome.ending, outcome.reason) == (Ending.OUT_OF_MEMORY, "out of memory (limit 64 MB)")


def test_delegated_cgroups_name_too_many_processes(image, place, delegated):
    outcome, _ = as_nobody(image, place, "bomb() { bomb | bomb & }; bomb; sleep 60", before=delegated)
    assert (outcome.ending, outcome.reason) == (Ending.TOO_MANY_PROCESSES, "too many processes (limit 32)")


def test_a_root_worker_without_a_writable_pids_cgroup_refuses_the_pids_limit(image, place):
    """RLIMIT_NPROC does not bind root, so without a pids cgroup the limit cannot hold: the run is refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    pids = str(limiting_dirs()["pids"].mount).encode()

    def read_only_pids_cgroup():  # in the child's own mount namespace, as inside a container
        ms_rdonly, ms_remount, ms_bind, ms_rec, ms_private, clone_newns = 1, 32, 4096, 16384, 1 << 18, 0x20000
        assert libc.unshare(clone_newns) == 0
        assert libc.mount(None, b"/", None, ms_rec | ms_private, None) == 0
        assert libc.mount(pids, pids, None, ms_bind, None) == 0
        assert libc.mount(None, pids, None, ms_remount | ms_bind | ms_rdonly, None) == 0

    def start():
        try:
            place.run(image, "true", tier="B")
        except LimitUnenforceable as refused:
            return refused.limit, refused.message, refused.status_code

    limit, message, status = Forked(start, nobody=False, before=read_only_pids_cgroup).result()
    assert (limit, status) == ("pids", 400)
    assert message == ("limits.pids: sandbox tier B on this worker cannot enforce it (no writable pids cgroup, and "
                       "RLIMIT_NPROC does not bind root); run it on a worker that offers tier A")  # fmt: skip
    assert shutil.which("runc")  # the host itself still offers tier A


def test_a_file_the_plugin_made_unreadable_is_left_out_and_the_rest_copied(image, place):
    outcome, _ = as_nobody(image, place, "echo a > /out/a.txt; echo b > /out/b.txt; chmod 000 /out/a.txt")
    assert (outcome.ending, outcome.files) == (Ending.COMPLETED, ["b.txt"])
