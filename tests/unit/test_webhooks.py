"""kiln.webhooks against the Standard Webhooks specification's published test vector and its own library."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from kiln.errors import Unauthorized
from kiln.webhooks import WebhookSignatureError, new_secret, secret_key, sign, verify

# the specification's test vector
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
HEADERS = {"webhook-id": MSG_ID, "webhook-timestamp": str(TIMESTAMP), "webhook-signature": SIGNATURE}


def test_signing_reproduces_the_specifications_test_vector():
    assert sign(SECRET, MSG_ID, BODY, timestamp=TIMESTAMP) == HEADERS


def test_the_test_vector_verifies_at_its_own_time_and_gives_the_webhook_id():
    assert verify(SECRET, BODY, HEADERS, now=TIMESTAMP + 10) == MSG_ID
    # header names are case-insensitive, as HTTP's are
    assert verify(SECRET, BODY, {k.title(): v for k, v in HEADERS.items()}, now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_a_timestamp_more_than_five_minutes_off_is_stale(skew):
    with pytest.raises(WebhookSignatureError, match="more than the 300 s allowed") as caught:
        verify(SECRET, BODY, HEADERS, now=TIMESTAMP - skew)
    assert caught.value.reason == "stale"
    assert isinstance(caught.value, Unauthorized) and caught.value.status_code == 401


def test_a_body_changed_by_one_byte_or_reformatted_does_not_verify():
    for body in (b'{"test": 2432232315}', b'{"test":2432232314}', BODY + b" "):
        with pytest.raises(WebhookSignatureError, match="no v1 signature matches") as caught:
            verify(SECRET, body, HEADERS, now=TIMESTAMP)
        assert caught.value.reason == "bad_signature"


def test_a_wrong_secret_does_not_verify_and_the_message_names_no_secret():
    other = new_secret()
    with pytest.raises(WebhookSignatureError) as caught:
        verify(other, BODY, HEADERS, now=TIMESTAMP)
    assert other not in str(caught.value) and SECRET not in str(caught.value)
    assert SIGNATURE not in str(caught.value)


def test_rotation_two_signatures_in_one_header_and_two_secrets_at_the_receiver():
    new = new_secret()
    headers = sign([new, SECRET], MSG_ID, BODY, timestamp=TIMESTAMP)
    first, second = headers["webhook-signature"].split(" ")
    assert second == SIGNATURE and first.startswith("v1,") and first != SIGNATURE
    # a receiver with either secret accepts it; one with both accepts the old signature alone
    assert verify(SECRET, BODY, headers, now=TIMESTAMP) == MSG_ID
    assert verify(new, BODY, headers, now=TIMESTAMP) == MSG_ID
    assert verify([new, SECRET], BODY, HEADERS, now=TIMESTAMP) == MSG_ID


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_a_missing_header_is_named(name):
    headers = {k: v for k, v in HEADERS.items() if k != name}
    with pytest.raises(WebhookSignatureError, match=f"^{name}: the header is missing") as caught:
        verify(SECRET, BODY, headers, now=TIMESTAMP)
    assert caught.value.reason == "missing_header"


@pytest.mark.parametrize("signature", ["garbage", "v1,", "v1,!!!not-base64", "v2," + SIGNATURE[3:], "v1a,xyz v1"])
def test_malformed_signature_entries_match_nothing_and_raise_only_the_signature_error(signature):
    with pytest.raises(WebhookSignatureError, match="no v1 signature matches"):
        verify(SECRET, BODY, {**HEADERS, "webhook-signature": signature}, now=TIMESTAMP)
    # a good entry after a malformed one still counts
    assert verify(SECRET, BODY, {**HEADERS, "webhook-signature": f"{signature} {SIGNATURE}"}, now=TIMESTAMP)


@pytest.mark.parametrize("stamp", ["-5", "1614265330.5", "soon", "9" * 20])
def test_a_timestamp_that_is_not_unix_seconds_is_refused(stamp):
    with pytest.raises(WebhookSignatureError, match="is not Unix seconds"):
        verify(SECRET, BODY, {**HEADERS, "webhook-timestamp": stamp}, now=TIMESTAMP)


def test_the_standardwebhooks_library_accepts_what_kiln_signs_and_kiln_accepts_what_it_signs():
    secret, body = new_secret(), b'{"booking": "B-1", "status": "completed"}'
    headers = sign(secret, "msg_1", body)
    assert Webhook(secret).verify(body, headers) == {"booking": "B-1", "status": "completed"}
    theirs = Webhook(secret).sign("msg_2", datetime.now(timezone.utc), body.decode())
    assert verify(secret, body, {"webhook-id": "msg_2", "webhook-timestamp": str(int(time.time())),
                                 "webhook-signature": theirs})  # fmt: skip
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)


@pytest.mark.parametrize(
    ("secret", "problem"),
    [("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with 'whsec_'"), ("whsec_not base64!", "not valid base64"),
     ("whsec_c2hvcnQ=", "holds 24 to 64 bytes after 'whsec_'; this one holds 5")],
)  # fmt: skip
def test_a_malformed_secret_is_refused_without_repeating_it(secret, problem):
    with pytest.raises(ValueError, match=problem) as caught:
        secret_key(secret)
    assert secret not in str(caught.value)


def test_new_secrets_are_valid_and_differ():
    one, two = new_secret(), new_secret()
    assert one != two and len(secret_key(one)) == 32
