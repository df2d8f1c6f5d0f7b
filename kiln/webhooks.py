"""Standard Webhooks signatures: the one place kiln signs and verifies a lab's callbacks (and the simulator signs).

A callback carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`: space-separated
`v1,<base64 HMAC-SHA256 of "id.timestamp.body">` entries, one per secret the sender signs with (two while a key is
rotated). Secrets are `whsec_<base64 of 24 to 64 random bytes>`. The HMAC itself is the `standardwebhooks`
package's; its own `verify` takes one secret, reads the wall clock and lets a malformed header raise what it
happens to, so the reading of the headers is here.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets as _random
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from standardwebhooks import Webhook

from kiln.errors import Unauthorized
from kiln.schemas.labs import (
    WEBHOOK_ID_HEADER,
    WEBHOOK_SIGNATURE_HEADER,
    WEBHOOK_TIMESTAMP_HEADER,
    WEBHOOK_TOLERANCE_S,
)

SECRET_PREFIX = "whsec_"


class WebhookSignatureError(Unauthorized):
    """A callback whose headers, timestamp or signature do not check out; `reason` says which."""

    def __init__(self, reason: str, message: str):
        super().__init__(message, details={"type": f"webhook_{reason}", "msg": message})
        self.reason = reason  # missing_header, bad_timestamp, stale, bad_signature


def new_secret() -> str:
    """A fresh signing secret, `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The key bytes of a `whsec_…` secret; ValueError, naming what is wrong but not the secret, otherwise."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook signing secret starts with 'whsec_' followed by base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error:
        raise ValueError("a webhook signing secret's part after 'whsec_' is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook signing secret holds 24 to 64 bytes after 'whsec_'; this one holds {len(key)}")
    return key


def _signatures(secrets: str | Sequence[str], msg_id: str, timestamp: int, body: str) -> list[str]:
    """`v1,<base64>` for each secret, in order."""
    keys = [secret_key(secret) for secret in ([secrets] if isinstance(secrets, str) else secrets)]
    signed_at = datetime.fromtimestamp(timestamp, timezone.utc)
    return [Webhook(key).sign(msg_id, signed_at, body) for key in keys]


def sign(secrets: str | Sequence[str], msg_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`, signed with each secret (now, unless `timestamp` is given)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        WEBHOOK_ID_HEADER: msg_id,
        WEBHOOK_TIMESTAMP_HEADER: str(timestamp),
        WEBHOOK_SIGNATURE_HEADER: " ".join(_signatures(secrets, msg_id, timestamp, body.decode())),
    }


def verify(
    secrets: str | Sequence[str],
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    tolerance_s: float = WEBHOOK_TOLERANCE_S,
) -> str:
    """The callback's webhook-id, once one of its signatures matches one of `secrets` and its timestamp is within
    `tolerance_s` of `now`; WebhookSignatureError otherwise.

    Several secrets are for the receiver's side of a rotation (old and new both accepted for a while); several
    signatures in the header are for the sender's. The body must be the bytes as received, not JSON read and written
    again.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    for name in (WEBHOOK_ID_HEADER, WEBHOOK_TIMESTAMP_HEADER, WEBHOOK_SIGNATURE_HEADER):
        if not lowered.get(name):
            raise WebhookSignatureError("missing_header", f"{name}: the header is missing; the callback is unsigned")
    msg_id, stamp = lowered[WEBHOOK_ID_HEADER], lowered[WEBHOOK_TIMESTAMP_HEADER]
    if not stamp.isdigit() or len(stamp) > 12:
        raise WebhookSignatureError("bad_timestamp", f"{WEBHOOK_TIMESTAMP_HEADER}: {stamp[:20]!r} is not Unix seconds")
    skew = int(stamp) - (time.time() if now is None else now)
    if abs(skew) > tolerance_s:
        raise WebhookSignatureError(
            "stale", f"{WEBHOOK_TIMESTAMP_HEADER}: the callback was signed {abs(skew):.0f} s "
            f"{'before' if skew < 0 else 'after'} now, more than the {tolerance_s:.0f} s allowed (a stale or replayed "
            "callback, or a clock that is off)",
        )
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise WebhookSignatureError("bad_signature", "body: not UTF-8, so not a body the lab signed") from None
    expected = [base64.b64decode(entry[3:]) for entry in _signatures(secrets, msg_id, int(stamp), text)]
    for entry in lowered[WEBHOOK_SIGNATURE_HEADER].split():
        version, _, signature = entry.partition(",")
        if version != "v1":
            continue  # a scheme kiln does not know (v1a, asymmetric) is skipped, as the specification says
        try:
            given = base64.b64decode(signature + "=" * (-len(signature) % 4), validate=True)
        except binascii.Error:
            continue
        if any(hmac.compare_digest(given, digest) for digest in expected):
            return msg_id
    raise WebhookSignatureError(
        "bad_signature", f"{WEBHOOK_SIGNATURE_HEADER}: no v1 signature matches the lab's signing secret (a forged or "
        "altered callback, or the lab signs with a secret kiln does not have)",
    )
