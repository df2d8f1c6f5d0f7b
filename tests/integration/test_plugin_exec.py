"""plugin_exec jobs against the real stack and the real sandbox: a busybox plugin runs each attack as a job, which
must end with its named reason and leave nothing behind (no container, cgroup, mount, process or bundle)."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import httpx
import pytest

from kiln.errors import KilnError
from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, flow_run_state, left_behind, wait_until

# a job type's own tests: the database does not matter to them (the platform's run on both)
pytestmark = JOB_TYPE_TESTS


def run(client, plugin: str, script: str, **fields):
    return client.jobs.create(type="plugin_exec", input={"plugin": plugin, "args": [script], **fields})


def ended(client, plugin: str, script: str, timeout: float = 90, **fields):
    """The job of `script`, ended, after checking it left nothing behind."""
    job = run(client, plugin, script, **fields).wait(timeout=timeout)
    assert left_behind(job.flow_run_id) == []
    return job


def test_a_plugin_gets_its_input_and_files_and_gives_output_files_and_progress(client, shell_plugin, idle, tmp_path):
    data = tmp_path / "atoms.xyz"
    data.write_text("2\nH2\nH 0 0 0\nH 0 0 0.74\n")
    client.files.upload(data)
    script = ("read -r line; echo \"stdin $line\"; cat /in/input.json; echo; head -1 /in/atoms.xyz; "
              "echo '{\"energy\": -1.5}' > /out/output.json; mkdir /out/sub; echo deep > /out/sub/x.txt; "
              "echo done > /out/result.txt; echo step 1; echo step 2; id -u")  # fmt: skip
    job = ended(client, shell_plugin, script, input={"n": 7}, files=["atoms.xyz"])
    assert job.status.value == "completed", job.status_reason
    out = job.output
    assert out["ending"] == "completed" and out["exit_code"] == 0 and out["output"] == {"energy": -1.5}
    assert out["stdout"].splitlines() == ['stdin {"n": 7}', '{"n": 7}', "2", "step 1", "step 2", "65534"]
    assert out["tier"] in ("A", "B") and out["limits"]["memory_mb"] == 64
    names = {f["name"]: f for f in out["files"]}
    assert set(names) == {"output.json", "result.txt", "sub__x.txt"} and names["sub__x.txt"]["path"] == "/out/sub/x.txt"
    assert {f.name for f in client.jobs.files(job.id)} == set(names)
    assert client.jobs.download(job.id, "result.txt", tmp_path).read_text() == "done\n"
    progress = [e.data.get("message") for e in client.jobs.events(job.id) if e.event == "progress"]
    assert "step 2" in "\n".join(m or "" for m in progress)


def test_a_failing_plugin_fails_the_job_with_its_exit_code_and_stderr_and_keeps_its_output(client, shell_plugin, idle):
    job = ended(client, shell_plugin, "echo partial; echo 'no structure given' >&2; exit 3")
    assert job.status.value == "failed"
    assert job.status_reason == "exited with code 3: no structure given"
    assert job.output["stdout"] == "partial\n" and job.output["exit_code"] == 3
    assert flow_run_state(job.flow_run_id) == "FAILED"


@pytest.mark.parametrize("script, limits, reason", [
    ("head -c 200000000 /dev/zero | tail > /dev/null", {}, "out of memory (limit 64 MB)"),
    ("bomb() { bomb | bomb & }; bomb; sleep 30", {}, "too many processes (limit 32)"),
    ("while :; do :; done", {"wall_seconds": 2}, "wall time limit (2 s)"),
    ("head -c 3000000 /dev/zero > /out/big", {}, "output larger than 1 MB"),
])  # fmt: skip
def test_a_limit_that_trips_fails_the_job_naming_it(client, shell_plugin, idle, script, limits, reason):
    job = ended(client, shell_plugin, script, limits=limits)
    assert (job.status.value, job.status_reason) == ("failed", reason)
    assert job.output["ending"] != "completed"


def test_the_host_loopback_is_out_of_reach(client, shell_plugin, idle):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []
    listener.settimeout(0.2)

    def accept():
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    watcher = threading.Thread(target=accept)
    watcher.start()
    job = ended(client, shell_plugin, f"nc -w 2 127.0.0.1 {port} </dev/null && echo CONNECTED; "
                               f"wget -q -T 2 -O- http://127.0.0.1:{port}/ && echo FETCHED; exit 0")  # fmt: skip
    watcher.join()
    listener.close()
    assert job.status.value == "completed", job.status_reason
    assert "CONNECTED" not in job.output["stdout"] and "FETCHED" not in job.output["stdout"]
    assert accepted == []


def test_kiln_home_and_the_hosts_secrets_are_out_of_reach(client, shell_plugin, idle):
    secret = SETTINGS.home_dir / f"secret-{uuid.uuid4().hex[:6]}"
    secret.write_text("kiln-home-secret")
    script = (f"cat {secret}; cat {SETTINGS.home_dir}/kiln.db; ls {SETTINGS.sandbox_root}; cat /etc/shadow; "
              "echo x > /etc/passwd && echo WROTE_ETC; echo x > /x && echo WROTE_ROOT; echo x > /in/x && echo WROTE_IN; "
              "echo x > /tmp/x && echo WROTE_TMP; exit 0")  # fmt: skip
    job = ended(client, shell_plugin, script)
    stdout = job.output["stdout"]
    assert "kiln-home-secret" not in stdout
    assert open("/etc/shadow").read().split(":")[1] not in stdout  # the image's own /etc/shadow is all it sees
    assert "image-shadow" in stdout
    assert "WROTE_TMP" in stdout and not {"WROTE_ETC", "WROTE_ROOT", "WROTE_IN"} & set(stdout.split())


def test_mount_ptrace_unshare_and_setuid_are_refused(client, shell_plugin, idle):
    script = ("mount -t tmpfs none /tmp && echo MOUNTED; unshare -r -m true && echo UNSHARED; "
              "unshare -p -f true && echo PIDNS; su -c id root && echo ROOT; "
              "sleep 5 & nsenter -t $! -U true && echo ENTERED; "
              "grep -E '^(CapEff|NoNewPrivs|TracerPid):' /proc/self/status; "
              "cat /proc/1/environ > /dev/null && echo READ_INIT; exit 0")  # fmt: skip
    job = ended(client, shell_plugin, script)
    stdout = job.output["stdout"]
    assert not {"MOUNTED", "UNSHARED", "PIDNS", "ROOT", "ENTERED"} & set(stdout.split()), stdout
    assert "CapEff:\t0000000000000000" in stdout and "NoNewPrivs:\t1" in stdout


def test_a_plugin_that_ignores_sigterm_is_killed_when_the_job_is_cancelled(client, shell_plugin, idle):
    job = run(client, shell_plugin, "trap '' TERM INT; echo ready; while :; do sleep 1; done")
    wait_until(lambda: any(e.event == "progress" for e in client.jobs.events(job.id, last_event_id=None)
                           if not e.is_terminal) if client.jobs.get(job.id).status.value == "running" else False,
               timeout=180, what="the plugin to start")  # fmt: skip
    job = client.jobs.get(job.id)
    client.jobs.cancel(job.id)
    started = time.monotonic()
    wait_until(lambda: left_behind(job.flow_run_id) == [], timeout=10, what="the container to go")
    gone = time.monotonic() - started
    job.wait(timeout=180)
    assert job.status.value == "cancelled"
    print(f"container gone {gone:.2f} s after the cancel")


def test_bad_runs_are_refused_at_submission_naming_the_field(client, shell_plugin, http):
    def refused(input):
        answer = http.post("/api/v1/jobs", json={"type": "plugin_exec", "input": input})
        assert answer.status_code == 422, answer.text
        return answer.json()

    unknown = refused({"plugin": "no-such-plugin"})
    assert unknown["detail"].startswith("input.plugin: no plugin 'no-such-plugin' is registered; registered: ")
    assert shell_plugin in unknown["detail"]
    schema = refused({"plugin": shell_plugin, "input": {"n": "seven"}})
    assert schema["detail"] == "input.input.n: 'seven' is not of type 'integer'"
    assert refused({"plugin": shell_plugin, "files": ["never-uploaded.txt"]})["errors"][0]["loc"] == ["input", "files", 0]
    assert "limits" in refused({"plugin": shell_plugin, "limits": {"memory_mb": 1}})["detail"]
    assert "env" in refused({"plugin": shell_plugin, "env": {"A=B": "c"}})["detail"]


def test_a_tier_the_worker_does_not_offer_fails_the_job_before_it_starts(client, shell_plugin, idle):
    offered = httpx.get(f"{SETTINGS.api_url}/healthz").json()["sandbox_tiers"]
    tiers = set().union(*offered.values())
    assert tiers and tiers <= {"A", "B"}
    missing = {"A", "B"} - tiers
    if not missing:
        pytest.skip("this worker offers both tiers")
    job = ended(client, shell_plugin, "echo ran", tier=missing.pop())
    assert job.status.value == "failed" and "tier" in job.status_reason and job.output is None


def test_tier_b_runs_the_same_plugin_with_the_same_limits(client, shell_plugin, idle):
    done = ended(client, shell_plugin, "id -u; cat /proc/self/status | grep -E '^(CapEff|NoNewPrivs):'", tier="B")
    assert done.status.value == "completed" and done.output["tier"] == "B", done.status_reason
    assert done.output["stdout"].split() == ["65534", "CapEff:", "0000000000000000", "NoNewPrivs:", "1"]
    hog = ended(client, shell_plugin, "head -c 200000000 /dev/zero | tail > /dev/null", tier="B")
    assert (hog.status.value, hog.status_reason) == ("failed", "out of memory (limit 64 MB)")


def test_the_sdk_raises_a_named_error_for_an_unknown_plugin(client):
    with pytest.raises(KilnError) as raised:
        client.jobs.create(type="plugin_exec", input={"plugin": "nope"})
    assert "input.plugin" in str(raised.value)


def test_a_run_refused_before_it_starts_fails_with_only_the_reason(client, http, idle, tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.sandbox.busybox_image import write_layout

    plugin = f"gone-{uuid.uuid4().hex[:6]}"
    layout = write_layout(tmp_path / "layout", cmd=["echo", plugin])  # an image of its own: its own folder
    added = subprocess.run([sys.executable, "-m", "kiln.cli", "plugins", "add", plugin, "--image", str(layout)],
                           capture_output=True, text=True)  # fmt: skip
    assert added.returncode == 0, added.stderr
    folder = {p["name"]: p for p in http.get("/api/v1/plugins").json()}[plugin]["image_path"]
    shutil.rmtree(folder)
    job = client.jobs.create(type="plugin_exec", input={"plugin": plugin}).wait(timeout=180)
    assert job.status.value == "failed" and job.output is None
    assert job.status_reason == (f"the plugin image {folder} is not on this worker: is KILN_HOME shared between the "
                                 "kiln API and its workers?")  # fmt: skip
    subprocess.run([sys.executable, "-m", "kiln.cli", "plugins", "remove", plugin], capture_output=True)
