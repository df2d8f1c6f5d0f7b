"""Tier A: runc as root with cgroups. Each limit trips with its own reason; the sandbox keeps the host out of reach."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kiln.tasks.plugin import Ending, Limits, PluginRun, detect_tier
from tests.sandbox.conftest import SMALL


async def test_this_root_process_offers_tier_a(base):
    assert detect_tier().tier == "A"


async def test_hello_world_reads_its_input_and_returns_output_json_and_files(image, place):
    lines = []
    outcome = await place.run(
        image,
        'read -r line; echo "stdin: $line"; echo "in: $(cat /in/input.json) $(cat /in/data/a.txt)"; id -u; '
        'mkdir -p /out/sub && echo 42 > /out/sub/answer.txt && echo "{\\"sum\\": 3}" > /out/output.json',
        input={"a": 1, "b": 2}, files={"data/a.txt": b"hello"}, on_stdout=lines.append,
    ).run()  # fmt: skip
    assert (outcome.ending, outcome.reason, outcome.exit_code) == (Ending.COMPLETED, "completed", 0)
    assert lines == ['stdin: {"a": 1, "b": 2}', 'in: {"a": 1, "b": 2} hello', "65534"]
    assert outcome.output == {"sum": 3}
    assert outcome.files == ["output.json", "sub/answer.txt"]
    assert (place.results / "sub" / "answer.txt").read_text() == "42\n"
    assert outcome.tier == "A"


async def test_a_memory_hog_ends_out_of_memory_with_its_limit(image, place):
    # tail holds every line it reads; /dev/zero has no newline
    outcome = await place.run(image, "head -c 300000000 /dev/zero | tail; echo survived", limits=SMALL).run()
    assert outcome.ending is Ending.OUT_OF_MEMORY
    assert outcome.reason == "out of memory (limit 64 MB)"


async def test_a_fork_bomb_ends_too_many_processes_without_waiting_for_the_wall_time(image, place):
    started = time.monotonic()
    outcome = await place.run(image, "bomb() { bomb | bomb & }; bomb; sleep 60").run()
    assert outcome.ending is Ending.TOO_MANY_PROCESSES
    assert outcome.reason == "too many processes (limit 32)"
    assert time.monotonic() - started < 5


async def test_a_cpu_spin_ends_at_the_wall_time(image, place):
    started = time.monotonic()
    outcome = await place.run(image, "while :; do :; done", limits=SMALL.model_copy(update={"wall_seconds": 2})).run()
    assert (outcome.ending, outcome.reason) == (Ending.WALL_TIME_LIMIT, "wall time limit (2 s)")
    assert 2 <= time.monotonic() - started < 4


async def test_the_cpu_quota_holds_two_spinners_to_a_quarter_core(image, place):
    spin = "(while :; do :; done) &"
    outcome = await place.run(image, f"{spin} a=$!; {spin} b=$!; sleep 2; kill $a $b; wait; times",
                              limits=SMALL.model_copy(update={"cpus": 0.25})).run()  # fmt: skip
    assert outcome.ending is Ending.COMPLETED, outcome.reason
    # `times`: the shell's own user/system time, then its children's, as 0m1.900s
    user, system = (float(t.split("m")[1].rstrip("s")) for t in outcome.stdout.splitlines()[1].split())
    assert 0.2 < user + system < 0.8  # 2 s of wall time at a quarter core; unlimited they would take 2-4 s


async def test_writing_past_output_mb_ends_output_too_large_and_keeps_what_fit(image, place):
    outcome = await place.run(image, "head -c 5000000 /dev/zero > /out/big.bin; echo $? >&2").run()
    assert (outcome.ending, outcome.reason) == (Ending.OUTPUT_TOO_LARGE, "output larger than 1 MB")
    assert outcome.files == ["big.bin"]
    assert 900_000 < (place.results / "big.bin").stat().st_size <= 1024 * 1024


async def test_a_failing_plugin_ends_with_its_exit_code_and_the_end_of_its_stderr(image, place):
    outcome = await place.run(image, "echo starting; seq 1 2000 >&2; echo 'bad input: x' >&2; exit 3").run()
    assert (outcome.ending, outcome.exit_code) == (Ending.EXIT_CODE, 3)
    assert outcome.reason.startswith("exited with code 3: ") and outcome.reason.endswith("2000\nbad input: x")
    assert outcome.stderr.endswith("bad input: x\n") and outcome.stdout == "starting\n"


async def test_the_host_loopback_is_out_of_reach(image, place):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        connect = f"echo hi | nc -w 2 127.0.0.1 {port} && echo CONNECTED"
        outcome = await place.run(image, f"cat /proc/net/dev; {connect}").run()
        with pytest.raises(TimeoutError):
            listener.accept()
    assert "CONNECTED" not in outcome.stdout
    interfaces = [line.split(":")[0].strip() for line in outcome.stdout.splitlines() if ":" in line]
    assert interfaces == ["lo"]


async def test_host_files_are_out_of_reach(image, place):
    secret = place.work.parent / "secret.txt"
    secret.write_text("host secret")
    secret.chmod(0o644)
    outcome = await place.run(image, f"cat {secret}; cat /etc/shadow; ls /").run()
    assert "host secret" not in outcome.stdout
    assert "No such file" in outcome.stderr
    assert outcome.stdout.startswith("root:image-shadow:")  # the image's own /etc/shadow


async def test_only_tmp_and_out_are_writable(image, place):
    outcome = await place.run(
        image, "for f in /x /etc/x /bin/x /in/x /tmp/x /out/x /dev/shm/x; do touch $f 2>/dev/null && echo ok $f; done"
    ).run()
    assert outcome.stdout.split("\n")[:-1] == ["ok /tmp/x", "ok /out/x", "ok /dev/shm/x"]


async def test_tmp_is_limited_to_tmp_mb(image, place):
    outcome = await place.run(image, "head -c 8000000 /dev/zero > /tmp/big; stat -c %s /tmp/big; df -k /tmp").run()
    size, *df = outcome.stdout.split()
    assert int(size) == 4 * 1024 * 1024
    assert df[df.index("/tmp") - 4] == "4096"  # its size in 1K blocks


async def test_mount_unshare_chroot_and_privilege_are_refused(image, place):
    outcome = await place.run(
        image,
        "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "mount -t tmpfs none /tmp && echo MOUNTED; unshare -r -m true && echo UNSHARED; unshare -n true && echo NET; "
        "chroot / true && echo CHROOTED; su -c id root && echo ROOT; nsenter -t 1 -m true && echo ENTERED; exit 0",
    ).run()  # fmt: skip
    assert outcome.stdout.split() == ["CapEff:", "0000000000000000", "NoNewPrivs:", "1", "Seccomp:", "2"]
    assert outcome.stderr.count("Operation not permitted") >= 4, outcome.stderr


async def test_cancel_kills_a_plugin_that_ignores_sigterm_within_2_s(image, place):
    lines = []
    run = place.run(image, "trap '' TERM INT; echo ready; while :; do sleep 1; done", on_stdout=lines.append)
    task = asyncio.ensure_future(run.run())
    while lines != ["ready"]:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    run.cancel()
    outcome = await task
    assert time.monotonic() - started < 2
    assert (outcome.ending, outcome.reason) == (Ending.CANCELLED, "cancelled")


async def test_an_asyncio_cancel_kills_the_run_and_cleans_up(image, place):
    lines = []
    task = asyncio.ensure_future(place.run(image, "trap '' TERM; echo ready; sleep 60", on_stdout=lines.append).run())
    while lines != ["ready"]:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2


async def test_two_runs_side_by_side_have_their_own_containers(image, place):
    first, second = (place.run(image, "echo $(hostname) && sleep 0.5") for _ in range(2))
    outcomes = await asyncio.gather(first.run(), second.run())
    assert [o.stdout for o in outcomes] == ["kiln\n", "kiln\n"]
    assert first.bundle.id != second.bundle.id


async def test_a_limit_below_its_minimum_is_refused(image, place):
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=1)
    with pytest.raises(Exception, match="files: '../x'"):
        PluginRun(image, run_id=place.run_id, work_dir=place.work, results_dir=place.results, files={"../x": b""})
