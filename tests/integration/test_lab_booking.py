"""lab_booking against the lab simulator (`kiln labs simulate`) as a real HTTP server on loopback: every switch ends
in exactly one final status with the right output, forged callbacks are refused and audited, a waiting booking holds
no worker, cancel reaches the lab, approval gates the booking, and bookings survive a kiln restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from kiln.webhooks import new_secret, sign
from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, flow_run_state, wait_final, wait_until
from tests.lab.support import Simulator, simulator

pytestmark = JOB_TYPE_TESTS

FINAL = ("completed", "failed", "cancelled")


def later() -> dict:
    """A booking whose slot starts in 1000 lab hours: about 17 minutes of the simulator's clock, so it is still to
    come while a test runs."""
    return {"earliest": (datetime.now(timezone.utc) + timedelta(hours=1000)).isoformat(), "duration_minutes": 60,
            "deadline_hours": 2000}  # fmt: skip


@pytest.fixture(scope="module")
def sim():
    with simulator() as lab:
        yield lab


def register(name: str, sim: Simulator, *, secret: str | None = None, rotate: bool = False) -> None:
    """`kiln labs add` as an operator runs it: the key and the secret from the environment."""
    env = {**os.environ, "LAB_KEY": sim.api_key, "LAB_SECRET": secret or sim.secret}
    added = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "labs", "add", name, "--base-url", sim.url, "--resource", "xrd-1",
         "--resource", "furnace-1", "--resource", "synth-1", "--key-env", "LAB_KEY", "--secret-env", "LAB_SECRET",
         *(["--rotate-secret"] if rotate else ["--overwrite"])],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr


@pytest.fixture(scope="module")
def lab(stack, sim) -> str:
    register("lab-a", sim)
    return "lab-a"


@pytest.fixture
def fresh(sim):
    """The simulator with every switch at its default."""
    sim.configure()
    return sim


def book(http, lab: str, **fields) -> dict:
    body = {"lab": lab, "resource": "xrd-1", "duration_minutes": 0.05, "deadline_hours": 1, **fields}
    response = http.post("/api/v1/jobs", json={"type": "lab_booking", "input": body})
    assert response.status_code == 202, response.text
    return response.json()


def events(http, job_id: str) -> list[tuple[str, dict]]:
    import json

    text = http.get(f"/api/v1/jobs/{job_id}/events", timeout=10).text
    found, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: ") and name:
            found.append((name, json.loads(line[6:])))
    return found


def final_events(http, job_id: str) -> list[str]:
    return [name for name, _ in events(http, job_id) if name in FINAL]


def lab_bookings(sim: Simulator, job_id: str) -> list[dict]:
    return [b for b in sim.client.get("/_sim/bookings").json()["bookings"] if b.get("reference") == job_id]


def waiting(http, sim, job: dict) -> list[dict]:
    """The job's bookings at the lab, once it has booked and waits for the lab (its status_reason says so)."""
    def booked():
        now = http.get(f"/api/v1/jobs/{job['id']}").json()
        assert now["status"] not in FINAL, (now["status"], now["status_reason"])
        return (now["status_reason"] or "").startswith(("booked", "started"))

    wait_until(booked, timeout=300, what=f"job {job['id']} to book and wait")
    return [{"booking": b["id"], **b} for b in lab_bookings(sim, job["id"])]


def exactly_one_end(http, sim, job: dict, status: str, timeout: float = 180) -> dict:
    ended = wait_final(http, job["id"], timeout=timeout)
    assert ended["status"] == status, (ended["status"], ended["status_reason"])
    assert final_events(http, job["id"]) == [status]
    assert len(lab_bookings(sim, job["id"])) == 1
    return ended


def test_a_booking_completes_with_the_lab_results_and_progress_events(http, lab, fresh):
    job = book(http, lab, protocol={"scan": "10-80 deg"})
    ended = exactly_one_end(http, fresh, job, "completed")
    output = ended["output"]
    assert output["lab"] == lab and output["resource"] == "xrd-1" and output["source"] == "callback"
    assert output["results"]["reference"] == job["id"]
    names = [name for name, _ in events(http, job["id"])]
    assert "booked" in names and "progress" in names


def test_unknown_lab_and_resource_and_window_are_refused_naming_the_field(http, lab):
    bad = http.post("/api/v1/jobs", json={"type": "lab_booking", "input": {
        "lab": "nowhere", "resource": "xrd-1", "duration_minutes": 1, "deadline_hours": 1}})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["detail"].startswith("input.lab:") and lab in bad.json()["detail"]
    bad = http.post("/api/v1/jobs", json={"type": "lab_booking", "input": {
        "lab": lab, "resource": "nmr-9", "duration_minutes": 1, "deadline_hours": 1}})  # fmt: skip
    assert bad.status_code == 422 and bad.json()["detail"].startswith("input.resource:")
    bad = http.post("/api/v1/jobs", json={"type": "lab_booking", "input": {
        "lab": lab, "resource": "xrd-1", "duration_minutes": 1, "deadline_hours": 1,
        "earliest": "2030-01-02T00:00:00Z", "latest": "2030-01-01T00:00:00Z"}})  # fmt: skip
    assert bad.status_code == 422 and "earliest" in bad.json()["detail"]


def test_duplicated_callbacks_change_nothing(http, lab, fresh):
    fresh.configure(duplicate_rate=1)
    job = book(http, lab)
    exactly_one_end(http, fresh, job, "completed")
    wait_until(lambda: any(d["kind"] == "duplicate" for d in fresh.deliveries()), what="a duplicate delivered")
    answered = [d["answer"] for d in fresh.deliveries() if d["kind"] == "duplicate" and d["answer"]]
    assert answered and set(answered) == {200}
    progress = [data for name, data in events(http, job["id"]) if name == "progress" and data.get("booking")]
    assert len(progress) == len({(d["percent"], d["message"]) for d in progress})


def test_reordered_callbacks_end_once_and_late_progress_changes_nothing(http, lab, fresh):
    fresh.configure(reorder_rate=1, callback_delay_s=3)  # after kiln has entered the booking
    job = book(http, lab)
    exactly_one_end(http, fresh, job, "completed")
    booking = lab_bookings(fresh, job["id"])[0]["id"]

    def late():
        taken = http.get(f"/api/v1/labs/{lab}/callbacks", params={"limit": 1000}).json()["taken"]
        return [c for c in taken if c["booking"] == booking and (c["effect"] or "").startswith("none: the booking had")]

    # started and progress come after the outcome, and change nothing
    wait_until(late, timeout=180, what="the callbacks after the outcome")
    assert http.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "completed"


def test_lost_callbacks_are_recovered_by_asking_the_lab(http, lab, fresh):
    fresh.configure(lost_rate=1)
    job = book(http, lab)
    ended = exactly_one_end(http, fresh, job, "completed")
    assert ended["output"]["source"] == "poll"


def test_delayed_callbacks_complete_the_job_when_they_come(http, lab, fresh):
    fresh.configure(callback_delay_s=3)
    job = book(http, lab, duration_minutes=60, deadline_hours=2)  # its slot ends in an hour: kiln does not ask before
    # read from its events afterwards, not watched: on a loaded machine the few seconds it waits can pass between polls
    ended = exactly_one_end(http, fresh, job, "completed", timeout=300)
    assert ended["output"]["source"] == "callback"
    names = [name for name, _ in events(http, job["id"])]
    assert names.index("booked") < names.index("completed"), names


def test_5xx_on_the_first_bookings_are_retried_with_the_same_key(http, lab, fresh):
    fresh.configure(booking_failures=2, booking_failure_mode="after_booking")
    job = book(http, lab)
    exactly_one_end(http, fresh, job, "completed")


def test_forged_stale_and_mutated_callbacks_are_refused_audited_and_change_nothing(http, lab, fresh):
    fresh.configure(forged_rate=1, stale_rate=1, mutated_rate=1)
    job = book(http, lab)
    ended = exactly_one_end(http, fresh, job, "completed")
    assert ended["output"]["results"]["reference"] == job["id"]  # not the mutated copy's
    bad = [d for d in fresh.deliveries() if d["kind"] in ("forged", "stale", "mutated")]
    assert bad and {d["answer"] for d in bad} == {401}
    refused = http.get(f"/api/v1/labs/{lab}/callbacks").json()["refused"]
    reasons = {r["reason"] for r in refused}
    assert {"bad_signature", "stale"} <= reasons
    # unsigned, by hand: 401 and audited
    before = len(refused)
    answer = httpx.post(f"{SETTINGS.api_url}/api/v1/hooks/labs/{lab}", json={"booking": "x", "status": "completed",
                        "sequence": 9, "at": datetime.now(timezone.utc).isoformat()})  # fmt: skip
    assert answer.status_code == 401
    assert len(http.get(f"/api/v1/labs/{lab}/callbacks").json()["refused"]) == before + 1


def test_a_forged_final_callback_for_a_waiting_booking_leaves_it_waiting(http, lab, fresh):
    fresh.configure(callback_delay_s=4)
    job = book(http, lab)
    booked = waiting(http, fresh, job)
    body = (f'{{"booking": "{booked[0]["booking"]}", "status": "failed", "message": "forged", "sequence": 99, '
            f'"at": "{datetime.now(timezone.utc).isoformat()}"}}').encode()  # fmt: skip
    for headers in (sign(new_secret(), "msg_forged", body),
                    sign(fresh.secret, "msg_stale", body, timestamp=int(time.time()) - 600)):
        answer = httpx.post(f"{SETTINGS.api_url}/api/v1/hooks/labs/{lab}", content=body, headers=headers)
        assert answer.status_code == 401, answer.text
    assert http.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"
    exactly_one_end(http, fresh, job, "completed")


def test_a_rotated_signing_secret_is_accepted(http, stack, sim):
    new = new_secret()
    register("lab-rot", sim)
    sim.configure(rotation_secret=new)  # the lab signs with the old and the new secret
    job = book(http, "lab-rot")
    exactly_one_end(http, sim, job, "completed")
    # kiln moves to the new secret, keeping the old as the previous one; the lab then signs with the new one only
    register("lab-rot", sim, secret=new, rotate=True)
    job = book(http, "lab-rot")
    exactly_one_end(http, sim, job, "completed")
    # a lab still signing with the old secret only is accepted while kiln keeps it as the previous one
    sim.configure()
    job = book(http, "lab-rot")
    exactly_one_end(http, sim, job, "completed")
    assert not http.get("/api/v1/labs/lab-rot/callbacks").json()["refused"]


def test_a_failed_run_fails_the_job_with_the_lab_message(http, lab, fresh):
    fresh.configure(fail_rate=1)
    job = book(http, lab)
    ended = exactly_one_end(http, fresh, job, "failed")
    assert "reports the run failed" in ended["status_reason"] and lab in ended["status_reason"]


def test_a_lab_side_cancel_ends_the_job_cancelled_with_the_lab_message(http, lab, fresh):
    job = book(http, lab, **later())
    booked = waiting(http, fresh, job)
    assert fresh.lab_cancel(booked[0]["booking"]).status_code == 200
    ended = exactly_one_end(http, fresh, job, "cancelled")
    assert "cancelled by the lab" in ended["status_reason"] and "maintenance" in ended["status_reason"]


def test_two_jobs_for_one_slot_book_two_windows(http, lab, fresh):
    earliest = (datetime.now(timezone.utc) + timedelta(hours=3)).isoformat()
    first, second = (book(http, lab, earliest=earliest, duration_minutes=60, deadline_hours=24) for _ in range(2))
    for job in (first, second):
        waiting(http, fresh, job)
    windows = sorted((b["start"], b["end"]) for job in (first, second) for b in lab_bookings(fresh, job["id"]))
    assert len(windows) == 2 and windows[0][1] <= windows[1][0]
    for job in (first, second):
        exactly_one_end(http, fresh, job, "completed")


def test_no_slot_before_latest_fails_saying_why(http, lab, fresh):
    start = datetime.now(timezone.utc) + timedelta(hours=5)
    fresh.configure(blocked=[{"resource": "xrd-1", "start": start.isoformat(),
                              "end": (start + timedelta(hours=2)).isoformat()}])  # fmt: skip
    job = book(http, lab, earliest=start.isoformat(), latest=(start + timedelta(hours=2)).isoformat(),
               duration_minutes=30, deadline_hours=24)  # fmt: skip
    ended = wait_final(http, job["id"])
    assert ended["status"] == "failed" and "no free 30-minute slot of xrd-1" in ended["status_reason"]


def test_cancel_during_the_wait_reaches_the_lab(http, lab, fresh):
    job = book(http, lab, **later())
    booked = waiting(http, fresh, job)
    answer = http.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 200, answer.text
    ended = wait_final(http, job["id"])
    assert ended["status"] == "cancelled" and f"the lab {lab} cancelled booking" in ended["status_reason"]
    assert fresh.booking(booked[0]["booking"])["status"] == "cancelled"
    assert final_events(http, job["id"]) == ["cancelled"]


def test_cancel_while_the_lab_is_down_ends_the_job_cancelled_saying_so(http, stack):
    with simulator() as down:
        register("lab-down", down)
        job = book(http, "lab-down", **later())
        waiting(http, down, job)
        down.process.kill()
        down.process.wait()
        answer = http.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 200, answer.text
    ended = wait_final(http, job["id"])
    assert ended["status"] == "cancelled", (ended["status"], ended["status_reason"])
    assert "did not confirm the cancel" in ended["status_reason"] and "it may still run it" in ended["status_reason"]
    assert final_events(http, job["id"]) == ["cancelled"]


def test_approval_gates_the_booking(http, lab, fresh):
    job = book(http, lab, approval=True)
    wait_until(lambda: "awaiting approval" in (http.get(f"/api/v1/jobs/{job['id']}").json()["status_reason"] or ""),
               timeout=120, what="awaiting approval")  # fmt: skip
    time.sleep(1)
    assert lab_bookings(fresh, job["id"]) == []  # nothing sent to the lab
    approved = http.post(f"/api/v1/jobs/{job['id']}/approve", json={"reason": "checked"})
    assert approved.status_code == 200, approved.text
    again = http.post(f"/api/v1/jobs/{job['id']}/approve", json={})
    assert again.status_code == 409 and "not awaiting approval" in again.json()["detail"]
    exactly_one_end(http, fresh, job, "completed")


def test_reject_ends_the_job_cancelled_with_the_reason(http, lab, fresh):
    job = book(http, lab, approval=True)
    wait_until(lambda: "awaiting approval" in (http.get(f"/api/v1/jobs/{job['id']}").json()["status_reason"] or ""),
               timeout=120, what="awaiting approval")  # fmt: skip
    assert http.post(f"/api/v1/jobs/{job['id']}/reject", json={}).status_code == 422  # a reason is required
    rejected = http.post(f"/api/v1/jobs/{job['id']}/reject", json={"reason": "wrong sample"})
    assert rejected.status_code == 200, rejected.text
    ended = wait_final(http, job["id"])
    assert ended["status"] == "cancelled" and "wrong sample" in ended["status_reason"]
    assert lab_bookings(fresh, job["id"]) == []
    sleep = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).json()
    answer = http.post(f"/api/v1/jobs/{sleep['id']}/approve", json={})
    assert answer.status_code == 409 and "lab_booking" in answer.json()["detail"]


def test_past_the_deadline_with_no_answer_the_job_fails_naming_the_booking(http, lab, fresh):
    # the lab runs ten times slower than the clock: asked, it says the booking is still under way
    fresh.configure(lost_rate=1, time_scale=0.1)
    # a resource the other tests leave free: changing the lab's time scale moves their bookings onto its clock's now
    job = book(http, lab, resource="synth-1", duration_minutes=0.1, deadline_hours=0.004)
    ended = wait_final(http, job["id"], timeout=180)
    assert ended["status"] == "failed" and lab_bookings(fresh, job["id"]), ended["status_reason"]
    booking = lab_bookings(fresh, job["id"])[0]["id"]
    assert "by the deadline" in ended["status_reason"] and booking in ended["status_reason"]
    assert "the lab last said" in ended["status_reason"]
    assert final_events(http, job["id"]) == ["failed"]


def test_fifty_waiting_bookings_hold_no_slot(http, lab, fresh, idle):
    jobs = [book(http, lab, **later()) for _ in range(50)]
    try:
        # booking is a flow run each, through the one-slot worker: minutes on a loaded 2-core machine
        wait_until(lambda: httpx.get(f"{SETTINGS.api_url}/healthz", timeout=30).json()["suspended_jobs"] >= 50,
                   timeout=900, interval=1, what="50 bookings waiting")  # fmt: skip
        assert httpx.get(f"{SETTINGS.api_url}/healthz", timeout=30).json()["busy_slots"] == 0
        # a job submitted now runs on the one slot while all 50 still wait: no booking holds it
        sleep = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).json()
        assert wait_final(http, sleep["id"], timeout=120)["status"] == "completed"
        for job in jobs:
            assert http.get(f"/api/v1/jobs/{job['id']}").json()["status"] == "running"
            assert flow_run_state(http.get(f"/api/v1/jobs/{job['id']}").json()["flow_run_id"]) == "PAUSED"
    finally:
        # no booking is left to load the tests after this one
        for job in jobs:
            http.post(f"/api/v1/jobs/{job['id']}/cancel")
    for job in jobs:
        assert wait_final(http, job["id"], timeout=120)["status"] == "cancelled"


def test_bookings_waiting_across_a_kiln_restart_complete_when_their_callbacks_come(http, lab, fresh, stack):
    fresh.configure(callback_delay_s=20, retry_base_s=1, retry_attempts=8)
    jobs = [book(http, lab, duration_minutes=60, deadline_hours=6) for _ in range(3)]
    for job in jobs:
        waiting(http, fresh, job)
    stack.stop("worker")
    stack.stop("api")
    stack.start_api()
    stack.start_worker()
    for job in jobs:
        exactly_one_end(http, fresh, job, "completed", timeout=240)  # the lab retries what came while kiln was down
