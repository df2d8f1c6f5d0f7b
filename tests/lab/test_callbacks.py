"""The simulator's callbacks as a receiver on loopback gets them, checked with kiln.webhooks.verify: signatures good,
forged, stale, mutated and rotated; duplicates, reordering, retries, delays and lost callbacks, each visible in
GET /_sim/deliveries with the answer the receiver gave.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from kiln.webhooks import new_secret
from tests.lab.support import CallbackReceiver, wait_until


def run_one(lab, windows, hooks, resource="xrd-1") -> str:
    """Books a soon window and waits until the lab has given up or succeeded on every callback of it."""
    booking = lab.book(resource, *windows.next(resource), hooks.url).json()["id"]
    lab.wait_for(booking, "completed", "failed")
    wait_until(lambda: settled(lab.deliveries(booking), lab), 10, f"the callbacks of {booking} delivered")
    return booking


def settled(deliveries, lab) -> bool:
    """Every callback's last genuine attempt got a 2xx, or was lost: nothing more is on its way for it."""
    last = {}
    for d in deliveries:
        if d["kind"] in ("genuine", "lost"):
            last[d["sequence"]] = d
    finals = [d for d in last.values() if d["status"] in ("completed", "failed", "cancelled")]
    return bool(finals) and len(last) == max(last) and all(
        d["kind"] == "lost" or (d["answer"] or 0) // 100 == 2 for d in last.values())


def test_genuine_callbacks_verify_and_every_attempt_is_listed_with_its_answer(lab, windows, hooks):
    booking = run_one(lab, windows, hooks)
    deliveries = lab.deliveries(booking)
    assert [(d["sequence"], d["status"], d["kind"], d["attempt"], d["answer"]) for d in deliveries] == [
        (1, "started", "genuine", 1, 200), (2, "progress", "genuine", 1, 200), (3, "progress", "genuine", 1, 200),
        (4, "completed", "genuine", 1, 200)]  # fmt: skip
    assert [msg_id for msg_id, _ in hooks.accepted] == [d["webhook_id"] for d in deliveries]
    assert len({d["webhook_id"] for d in deliveries}) == 4 and hooks.rejected == []


def test_a_receiver_with_another_secret_refuses_every_callback_and_the_lab_retries_then_gives_up(lab, windows):
    lab.configure(progress_steps=0, retry_base_s=0.01, retry_attempts=3)
    with CallbackReceiver(new_secret()) as stranger:
        booking = lab.book("xrd-1", *windows.next("xrd-1"), stranger.url).json()["id"]
        wait_until(lambda: len(lab.deliveries(booking)) == 6, 10, "3 attempts of each of 2 callbacks")
        assert stranger.accepted == [] and {reason for _, reason in stranger.rejected} == {"bad_signature"}
    assert Counter((d["status"], d["answer"]) for d in lab.deliveries(booking)) == {("started", 401): 3,
                                                                                   ("completed", 401): 3}


def test_forged_copies_are_refused_and_the_genuine_callback_with_the_same_id_still_gets_through(lab, windows, hooks):
    lab.configure(forged_rate=1)
    booking = run_one(lab, windows, hooks)
    deliveries = lab.deliveries(booking)
    forged = [d for d in deliveries if d["kind"] == "forged"]
    assert len(forged) == 4 and {d["answer"] for d in forged} == {401}
    genuine = [d for d in deliveries if d["kind"] == "genuine"]
    # each forged copy went first, under the webhook-id its genuine callback then used
    assert [d["webhook_id"] for d in forged] == [d["webhook_id"] for d in genuine]
    assert all(deliveries.index(f) < deliveries.index(g) for f, g in zip(forged, genuine))
    assert hooks.statuses(booking) == ["started", "progress", "progress", "completed"]
    assert [reason for _, reason in hooks.rejected] == ["bad_signature"] * 4


def test_stale_copies_older_than_five_minutes_are_refused(lab, windows, hooks):
    lab.configure(stale_rate=1, stale_by_s=301, progress_steps=0)
    booking = run_one(lab, windows, hooks)
    stale = [d for d in lab.deliveries(booking) if d["kind"] == "stale"]
    assert [(d["status"], d["answer"]) for d in stale] == [("started", 401), ("completed", 401)]
    assert [reason for _, reason in hooks.rejected] == ["stale", "stale"]
    assert hooks.statuses(booking) == ["started", "completed"]


def test_a_stale_by_within_the_tolerance_is_accepted(lab, windows, hooks):
    # the other side of the line: a copy signed 4 minutes ago verifies, so the receiver takes both copies
    lab.configure(stale_rate=1, stale_by_s=240, progress_steps=0)
    booking = run_one(lab, windows, hooks)
    assert {d["answer"] for d in lab.deliveries(booking)} == {200} and hooks.rejected == []
    assert hooks.statuses(booking) == ["started", "started", "completed", "completed"]


def test_a_body_mutated_after_signing_is_refused(lab, windows, hooks):
    lab.configure(mutated_rate=1, progress_steps=0, fail_rate=1)
    booking = run_one(lab, windows, hooks)
    mutated = [d for d in lab.deliveries(booking) if d["kind"] == "mutated"]
    assert [(d["status"], d["answer"]) for d in mutated] == [("started", 401), ("failed", 401)]
    # the tampered copies claimed success; what got through is the lab's failure
    assert hooks.statuses(booking) == ["started", "failed"]
    assert all(callback.results != {"tampered": True} for callback in hooks.callbacks(booking))


def test_key_rotation_two_signatures_verify_with_the_old_secret_or_the_new(lab, windows):
    new = new_secret()
    lab.configure(rotation_secret=new, progress_steps=0)
    for secret in (lab.secret, new):
        with CallbackReceiver(secret) as receiver:
            booking = run_one(lab, windows, receiver)
            assert receiver.statuses(booking) == ["started", "completed"] and receiver.rejected == []
    # and a receiver holding neither refuses them
    with CallbackReceiver(new_secret()) as stranger:
        lab.configure(rotation_secret=new, progress_steps=0, retry_attempts=1)
        booking = lab.book("xrd-1", *windows.next("xrd-1"), stranger.url).json()["id"]
        wait_until(lambda: len(stranger.rejected) == 2, 10, "both callbacks refused")
        assert stranger.accepted == []


def test_duplicates_arrive_twice_under_one_webhook_id(lab, windows, hooks):
    lab.configure(duplicate_rate=1)
    booking = run_one(lab, windows, hooks)
    wait_until(lambda: len(hooks.callbacks(booking)) == 8, 5, "8 deliveries")
    deliveries = lab.deliveries(booking)
    assert Counter(d["kind"] for d in deliveries) == {"genuine": 4, "duplicate": 4}
    ids = Counter(msg_id for msg_id, callback in hooks.accepted if callback.booking == booking)
    assert sorted(ids.values()) == [2, 2, 2, 2]
    assert [c.sequence for c in hooks.callbacks(booking)] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_reordered_callbacks_the_outcome_first_and_started_last(lab, windows, hooks):
    lab.configure(reorder_rate=1)
    booking = run_one(lab, windows, hooks)
    assert hooks.statuses(booking) == ["completed", "progress", "progress", "started"]
    assert [c.sequence for c in hooks.callbacks(booking)] == [4, 3, 2, 1]


def test_a_callback_answered_5xx_is_retried_with_a_growing_backoff_until_a_2xx(lab, windows):
    lab.configure(progress_steps=0, retry_base_s=0.1)
    with CallbackReceiver(lab.secret, fail_first=2) as busy:
        booking = run_one(lab, windows, busy)
        deliveries = lab.deliveries(booking)
        assert [(d["status"], d["attempt"], d["answer"]) for d in deliveries] == [
            ("started", 1, 503), ("started", 2, 503), ("started", 3, 200),
            ("completed", 1, 503), ("completed", 2, 503), ("completed", 3, 200)]  # fmt: skip
        sent = [datetime.fromisoformat(d["sent_at"]) for d in deliveries[:3]]
        gaps = [(b - a).total_seconds() for a, b in zip(sent, sent[1:])]
        # 0.1 s, then 0.2 s (lower bounds only: a loaded machine may take longer, never shorter)
        assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and max(gaps) < 5, gaps
        # one webhook-id across the retries of a callback
        assert len({d["webhook_id"] for d in deliveries[:3]}) == 1
        assert busy.statuses(booking) == ["started", "completed"]


def test_an_unreachable_receiver_is_retried_then_given_up_and_the_error_listed(lab, windows):
    lab.configure(progress_steps=0, retry_base_s=0.01, retry_attempts=2)
    booking = lab.book("xrd-1", *windows.next("xrd-1"), "http://127.0.0.1:9/hooks").json()["id"]
    wait_until(lambda: len(lab.deliveries(booking)) == 4, 10, "2 attempts of each of 2 callbacks")
    assert all(d["answer"] is None and "ConnectError" in d["error"] for d in lab.deliveries(booking))


def test_delayed_callbacks_wait_before_they_are_sent(lab, windows, hooks):
    lab.configure(callback_delay_s=0.4, progress_steps=0)
    booking = run_one(lab, windows, hooks)
    deliveries = lab.deliveries(booking)
    at = {c.sequence: c.at for c in hooks.callbacks(booking)}
    for delivery in deliveries:
        waited = (datetime.fromisoformat(delivery["sent_at"]) - at[delivery["sequence"]]).total_seconds()
        # the event loop's clock and the wall clock may differ by a few milliseconds
        assert waited >= 0.39, (delivery, waited)


def test_lost_callbacks_are_never_sent_and_polling_still_finds_the_result(lab, windows, hooks):
    lab.configure(lost_rate=1, progress_steps=1)
    booking = run_one(lab, windows, hooks)
    assert [(d["kind"], d["answer"], d["sent_at"]) for d in lab.deliveries(booking)] == [("lost", None, None)] * 3
    assert hooks.accepted == [] and hooks.answers == []
    found = lab.booking(booking)
    assert found["status"] == "completed" and found["results"]["resource"] == "xrd-1"


def test_rates_below_one_with_a_seed_hit_some_callbacks_and_not_others(lab, windows, hooks):
    lab.configure(duplicate_rate=0.5, forged_rate=0.5, progress_steps=18, seed=11)
    booking = run_one(lab, windows, hooks)
    kinds = Counter(d["kind"] for d in lab.deliveries(booking))
    assert kinds["genuine"] == 20 and 0 < kinds["duplicate"] < 20 and 0 < kinds["forged"] < 20
    # whatever the faults, each callback got through, and only the genuine ones were taken
    assert sorted({c.sequence for c in hooks.callbacks(booking)}) == list(range(1, 21))
    assert len(hooks.rejected) == kinds["forged"]
