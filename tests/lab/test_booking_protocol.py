"""The lab protocol's requests against the simulator over HTTP: auth, slots, idempotent booking, conflicts, cancel."""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from typer.testing import CliRunner

from kiln.cli import app
from kiln.schemas.labs import Booking, LabError, SlotList
from tests.lab.support import CallbackReceiver, iso, simulator

NOWHERE = "http://127.0.0.1:9/hooks"  # bookings whose callbacks no test reads


def test_every_request_needs_the_lab_api_key_and_the_answer_does_not_repeat_it(lab, windows):
    start, end = windows.next("synth-1", far=True)
    requests = [("GET", "/slots"), ("POST", "/bookings"), ("GET", "/bookings/B-1"), ("DELETE", "/bookings/B-1"),
                ("GET", "/_sim/deliveries"), ("POST", "/_sim/config")]  # fmt: skip
    stranger = httpx.Client(base_url=lab.url)
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": lab.api_key}):
        for method, path in requests:
            answer = stranger.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path, headers)
            assert LabError.model_validate(answer.json()).error == "unauthorized"
            assert answer.headers["www-authenticate"] == "Bearer"
            assert lab.api_key not in answer.text and "wrong-key" not in answer.text
    assert lab.slots("synth-1", start, end).status_code == 200


def test_slots_have_no_horizon_a_window_years_ahead_is_answered_whole(lab):
    start = datetime(2031, 1, 1, tzinfo=timezone.utc)
    end = start + timedelta(days=400)
    answer = lab.slots("furnace-1", start, end)
    assert answer.status_code == 200
    assert answer.json() == {"slots": [{"resource": "furnace-1", "start": iso(start), "end": iso(end)}], "next": None}


def test_slots_are_the_gaps_between_bookings_and_can_be_paged(lab):
    day = datetime(2032, 3, 1, 8, tzinfo=timezone.utc)
    for hour in (10, 13):
        assert lab.book("furnace-1", day.replace(hour=hour), day.replace(hour=hour + 1), NOWHERE).status_code == 201
    answer = SlotList.model_validate(lab.slots("furnace-1", day, day.replace(hour=18)).json())
    assert [(slot.start.hour, slot.end.hour) for slot in answer.slots] == [(8, 10), (11, 13), (14, 18)]
    # windows shorter than asked are left out; a capped list says where to go on
    longer = lab.slots("furnace-1", day, day.replace(hour=18), min_minutes=150).json()["slots"]
    assert [slot["start"] for slot in longer] == [iso(day.replace(hour=14))]
    first = lab.slots("furnace-1", day, day.replace(hour=18), limit=1).json()
    assert len(first["slots"]) == 1 and first["next"] == iso(day.replace(hour=11))
    rest = lab.slots("furnace-1", datetime.fromisoformat(first["next"]), day.replace(hour=18), limit=5).json()
    assert [(s["start"], s["end"]) for s in rest["slots"]] == [(iso(day.replace(hour=11)), iso(day.replace(hour=13))),
                                                              (iso(day.replace(hour=14)), iso(day.replace(hour=18)))]
    assert rest["next"] is None


def test_slots_of_every_resource_when_none_is_named(lab):
    start = datetime(2033, 1, 1, tzinfo=timezone.utc)
    answer = lab.slots(None, start, start + timedelta(hours=1)).json()
    assert sorted(slot["resource"] for slot in answer["slots"]) == ["furnace-1", "synth-1", "xrd-1"]


def test_slot_queries_that_cannot_be_answered_name_the_parameter(lab):
    start = datetime(2033, 1, 1, tzinfo=timezone.utc)
    cases = [({"resource": "nmr-9", "from": iso(start), "to": iso(start + timedelta(hours=1))}, "unknown_resource",
              "resource", "'nmr-9' is not a resource of this lab; it has xrd-1, furnace-1, synth-1"),
             ({"resource": "xrd-1", "from": iso(start)}, "invalid_request", "to", "to: required"),
             ({"resource": "xrd-1", "from": "2033-01-01T00:00:00", "to": iso(start)}, "invalid_request", "from",
              "with an offset"),
             ({"resource": "xrd-1", "from": iso(start), "to": iso(start)}, "invalid_request", "to", "after from")]
    for params, code, field, words in cases:
        answer = lab.client.get("/slots", params=params)
        assert answer.status_code == 422, params
        error = LabError.model_validate(answer.json())
        assert (error.error, error.field) == (code, field) and words in error.message


def test_the_same_idempotency_key_books_once(lab, windows):
    start, end = windows.next("synth-1", far=True)
    key = uuid.uuid4().hex
    first = lab.book("synth-1", start, end, NOWHERE, key=key, protocol={"scan": "2theta"}, reference="job-7")
    assert first.status_code == 201
    booking = Booking.model_validate(first.json())
    assert (booking.status.value, booking.resource, booking.start, booking.reference) == (
        "booked", "synth-1", start, "job-7")
    again = lab.book("synth-1", start, end, NOWHERE, key=key, protocol={"scan": "2theta"}, reference="job-7")
    assert again.status_code == 200 and again.json()["id"] == booking.id
    # the same request written in another time zone is the same request
    body = {"resource": "synth-1", "start": start.astimezone(timezone(timedelta(hours=2))).isoformat(),
            "end": iso(end), "protocol": {"scan": "2theta"}, "callback_url": NOWHERE, "reference": "job-7"}
    assert lab.client.post("/bookings", json=body, headers={"Idempotency-Key": key}).json()["id"] == booking.id
    # another body under the same key is refused, and the answer carries the booking the key made
    other = lab.book("synth-1", start, end, NOWHERE, key=key, protocol={"scan": "omega"}, reference="job-7")
    assert other.status_code == 422
    error = LabError.model_validate(other.json())
    assert (error.error, error.field, error.booking.id) == ("idempotency_key_reused", "Idempotency-Key", booking.id)
    mine = [b for b in lab.client.get("/_sim/bookings").json()["bookings"] if b["reference"] == "job-7"]
    assert [b["id"] for b in mine] == [booking.id]


def test_a_booking_without_an_idempotency_key_or_with_a_bad_field_is_refused_naming_it(lab, windows):
    start, end = windows.next("synth-1", far=True)
    good = {"resource": "synth-1", "start": iso(start), "end": iso(end), "protocol": {}, "callback_url": NOWHERE,
            "reference": "job-1"}  # fmt: skip
    answer = lab.client.post("/bookings", json=good)
    assert answer.status_code == 400 and answer.json()["field"] == "Idempotency-Key"
    cases = [({**good, "resource": "nmr-9"}, "unknown_resource", "resource", "'nmr-9' is not a resource"),
             ({**good, "end": iso(start - timedelta(hours=1))}, "invalid_request", None, "end: "),
             ({**good, "start": "2033-01-01T10:00:00"}, "invalid_request", "start", "timezone"),
             ({**good, "colour": "red"}, "invalid_request", "colour", "colour: Extra inputs are not permitted"),
             ({k: v for k, v in good.items() if k != "callback_url"}, "invalid_request", "callback_url",
              "callback_url: Field required"),
             ({**good, "start": iso(datetime.now(timezone.utc) - timedelta(hours=2))}, "invalid_request", "start",
              "is in the past")]  # fmt: skip
    for body, code, field, words in cases:
        answer = lab.client.post("/bookings", json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert answer.status_code == 422, body
        error = LabError.model_validate(answer.json())
        assert error.error == code and words in error.message, error
        assert field is None or error.field == field


def test_an_overlapping_window_is_409_slot_taken_and_a_touching_one_is_free(lab, windows):
    start, end = windows.next("synth-1", minutes=60, far=True)
    assert lab.book("synth-1", start, end, NOWHERE).status_code == 201
    for a, b in [(start, end), (start - timedelta(minutes=30), start + timedelta(minutes=1)),
                 (start + timedelta(minutes=10), start + timedelta(minutes=20)),
                 (start - timedelta(hours=1), end + timedelta(hours=1))]:  # fmt: skip
        answer = lab.book("synth-1", a, b, NOWHERE)
        assert answer.status_code == 409
        assert answer.json()["error"] == "slot_taken" and "ask GET /slots" in answer.json()["message"]
    assert lab.book("synth-1", end, end + timedelta(minutes=30), NOWHERE).status_code == 201
    windows.cursors[("synth-1", True)] = end + timedelta(minutes=30)


def test_two_clients_racing_for_one_window_exactly_one_books_it(lab, windows):
    start, end = windows.next("synth-1", far=True)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: lab.book("synth-1", start, end, NOWHERE, reference=f"racer-{n}"), range(8)))
    assert sorted(answer.status_code for answer in answers) == [201] + [409] * 7


def test_race_rate_another_client_takes_the_window_a_moment_before(lab, windows):
    start, end = windows.next("synth-1", far=True)
    assert [s["start"] for s in lab.slots("synth-1", start, end).json()["slots"]] == [iso(start)]
    lab.configure(race_rate=1)
    answer = lab.book("synth-1", start, end, NOWHERE)
    assert answer.status_code == 409 and answer.json()["error"] == "slot_taken"
    assert lab.slots("synth-1", start, end).json()["slots"] == []
    # the next window is still there for the loser
    later = windows.next("synth-1", far=True)
    lab.configure()
    assert lab.book("synth-1", *later, NOWHERE).status_code == 201


def test_blocked_windows_are_not_free_and_not_bookable(lab, windows):
    start, end = windows.next("synth-1", minutes=120, far=True)
    middle = start + timedelta(minutes=40), start + timedelta(minutes=80)
    lab.configure(blocked=[{"resource": "synth-1", "start": iso(middle[0]), "end": iso(middle[1])}])
    slots = lab.slots("synth-1", start, end).json()["slots"]
    assert [(s["start"], s["end"]) for s in slots] == [(iso(start), iso(middle[0])), (iso(middle[1]), iso(end))]
    assert lab.book("synth-1", *middle, NOWHERE).status_code == 409
    assert lab.book("synth-1", start, middle[0], NOWHERE).status_code == 201


def test_delete_cancels_once_then_409_and_an_unknown_booking_is_404(lab, windows, hooks):
    start, end = windows.next("synth-1", far=True)
    booking = lab.book("synth-1", start, end, hooks.url).json()
    answer = lab.client.delete(f"/bookings/{booking['id']}")
    assert answer.status_code == 200
    assert (answer.json()["status"], answer.json()["message"]) == ("cancelled", "cancelled at the client's request")
    assert lab.booking(booking["id"])["status"] == "cancelled"
    again = lab.client.delete(f"/bookings/{booking['id']}")
    assert again.status_code == 409 and again.json()["error"] == "already_final"
    assert again.json()["booking"]["status"] == "cancelled"
    assert lab.client.delete("/bookings/B-999999").status_code == 404
    assert lab.client.get("/bookings/B-999999").json()["error"] == "not_found"
    # the lab tells kiln too, and the window is free again
    hooks.wait_until(lambda: hooks.statuses(booking["id"]) == ["cancelled"])
    assert lab.slots("synth-1", start, end).json()["slots"][0]["start"] == iso(start)


def test_a_booking_runs_at_its_start_and_completes_with_results_from_its_protocol(lab, windows, hooks):
    start, end = windows.next("xrd-1", minutes=6)
    protocol = {"sample": "BaTiO3", "scan": {"from": 10, "to": 80}}
    booking = lab.book("xrd-1", start, end, hooks.url, protocol=protocol, reference="job-42").json()
    done = lab.wait_for(booking["id"], "completed")
    checksum = hashlib.sha256(json.dumps(protocol, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert done["results"] == {"resource": "xrd-1", "reference": "job-42", "protocol": protocol, "checksum": checksum,
                               "duration_minutes": 6.0}  # fmt: skip
    hooks.wait_until(lambda: hooks.statuses(booking["id"])[-1:] == ["completed"])
    callbacks = hooks.callbacks(booking["id"])
    assert [c.status.value for c in callbacks] == ["started", "progress", "progress", "completed"]
    assert [c.sequence for c in callbacks] == [1, 2, 3, 4]
    assert [c.progress.fraction for c in callbacks[1:3]] == [0.3333, 0.6667]
    assert callbacks[-1].results == done["results"] and hooks.rejected == []


def test_fail_rate_the_run_ends_failed_with_the_labs_reason(lab, windows, hooks):
    lab.configure(fail_rate=1, progress_steps=0)
    start, end = windows.next("xrd-1")
    booking = lab.book("xrd-1", start, end, hooks.url).json()
    failed = lab.wait_for(booking["id"], "failed", "completed")
    assert failed["status"] == "failed" and "sample holder jammed" in failed["message"] and failed["results"] is None
    hooks.wait_until(lambda: hooks.statuses(booking["id"]) == ["started", "failed"])
    assert hooks.callbacks(booking["id"])[-1].message == failed["message"]


def test_a_lab_side_cancel_ends_the_booking_and_tells_kiln(lab, windows, hooks):
    start, end = windows.next("synth-1", far=True)
    booking = lab.book("synth-1", start, end, hooks.url).json()
    answer = lab.lab_cancel(booking["id"])
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert "cancelled by the lab" in lab.booking(booking["id"])["message"]
    hooks.wait_until(lambda: hooks.statuses(booking["id"]) == ["cancelled"])
    assert "maintenance" in hooks.callbacks(booking["id"])[0].message
    assert lab.client.delete(f"/bookings/{booking['id']}").status_code == 409


def test_booking_failures_before_booking_503_until_the_nth_retry_books(lab, windows):
    lab.configure(booking_failures=2)
    start, end = windows.next("synth-1", far=True)
    key = uuid.uuid4().hex
    codes = [lab.book("synth-1", start, end, NOWHERE, key=key, reference="job-f1").status_code for _ in range(3)]
    assert codes == [503, 503, 201]
    # nothing was booked by the failed attempts: the window was free for the third
    assert len([b for b in lab.client.get("/_sim/bookings").json()["bookings"] if b["reference"] == "job-f1"]) == 1


def test_booking_failures_after_booking_the_answer_is_lost_and_the_retry_gets_the_same_booking(lab, windows):
    lab.configure(booking_failures=2, booking_failure_mode="after_booking")
    start, end = windows.next("synth-1", far=True)
    key = uuid.uuid4().hex
    answers = [lab.book("synth-1", start, end, NOWHERE, key=key, reference="job-f2") for _ in range(3)]
    assert [a.status_code for a in answers] == [500, 500, 200]
    made = [b for b in lab.client.get("/_sim/bookings").json()["bookings"] if b["reference"] == "job-f2"]
    assert [b["id"] for b in made] == [answers[2].json()["id"]]
    # a client that retried with a new key would have met its own booking
    assert lab.book("synth-1", start, end, NOWHERE, reference="job-f2").status_code == 409


def test_switches_refused_with_the_field_named_and_secrets_never_shown(lab):
    answer = lab.client.post("/_sim/config", json={"duplicate_rate": 2})
    assert answer.status_code == 422 and answer.json()["field"] == "duplicate_rate"
    answer = lab.client.post("/_sim/config", json={"rotation_secret": "not-a-secret"})
    assert answer.status_code == 422 and "whsec_" in answer.json()["message"]
    assert "not-a-secret" not in answer.text
    shown = lab.configure(rotation_secret="whsec_" + "QUJD" * 8, duplicate_rate=0.5)
    assert shown["rotation_secret"] == "set" and shown["duplicate_rate"] == 0.5
    assert "QUJD" not in lab.client.get("/_sim/config").text
    assert lab.configure()["duplicate_rate"] == 0  # replaced whole: what is left out is back to its default


def test_the_command_line_switches_and_secrets_from_the_environment():
    rotation = "whsec_" + "WFla" * 8
    with simulator(api_key="another-key", resources=("nmr-1",), duplicate_rate=0.25, booking_failures=3,
                   callback_delay_s=1.5, time_scale=60, rotation_secret=rotation, seed=7,
                   blocked=[{"resource": "nmr-1", "start": "2034-01-01T10:00:00Z",
                             "end": "2034-01-01T11:00:00Z"}]) as lab:  # fmt: skip
        shown = lab.client.get("/_sim/config").json()
        assert (shown["duplicate_rate"], shown["booking_failures"], shown["callback_delay_s"], shown["time_scale"],
                shown["seed"], shown["rotation_secret"]) == (0.25, 3, 1.5, 60, 7, "set")  # fmt: skip
        assert shown["blocked"] == [{"resource": "nmr-1", "start": "2034-01-01T10:00:00Z",
                                     "end": "2034-01-01T11:00:00Z"}]  # fmt: skip
        day = datetime(2034, 1, 1, 9, tzinfo=timezone.utc)
        slots = lab.slots("nmr-1", day, day + timedelta(hours=3)).json()["slots"]
        assert [s["start"] for s in slots] == ["2034-01-01T09:00:00Z", "2034-01-01T11:00:00Z"]
        assert httpx.get(lab.url + "/slots", headers={"Authorization": "Bearer lab-sim-key"}).status_code == 401


@pytest.mark.parametrize(
    ("arguments", "message"),
    [(["--duplicate-rate", "3"], "--duplicate-rate: Input should be less than or equal to 1"),
     (["--callback-delay", "-1"], "--callback-delay: Input should be greater than or equal to 0"),
     (["--booking-failure-mode", "sometimes"], "--booking-failure-mode: Input should be 'before_booking' or "),
     (["--blocked", "xrd-1,2034-01-01T10:00:00Z"], "--blocked: 'xrd-1,2034-01-01T10:00:00Z' is not RESOURCE,START,END"),
     (["--blocked", "xrd-1,2034-01-01T10:00:00Z,2034-01-01T09:00:00Z"], "--blocked: end: 2034-01-01T09:00:00+00:00 "
      "is not after start"),
     (["--secret", "whsec_c2hvcnQ="], "--secret: a webhook signing secret holds 24 to 64 bytes after 'whsec_'"),
     (["--resources", " , "], "--resources: name at least one resource")],
)  # fmt: skip
def test_a_bad_switch_on_the_command_line_stops_the_simulator_naming_the_option(arguments, message):
    result = CliRunner().invoke(app, ["labs", "simulate", "--port", "9", *arguments])
    assert result.exit_code == 1
    assert message in result.output and "c2hvcnQ" not in result.output


def test_the_receiver_fixture_refuses_what_it_cannot_verify(lab):
    # the tests below rely on the receiver refusing unsigned callbacks: check it does
    with CallbackReceiver(lab.secret) as receiver:
        answer = lab.client.post(receiver.url, json={"booking": "B-1"})
        assert answer.status_code == 401 and receiver.rejected == [(None, "missing_header")]
