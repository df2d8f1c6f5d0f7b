"""The lab protocol's bodies (README, "The lab protocol"): what kiln and a lab send each other, one definition for both.

kiln's lab client and its callback hook read and write these, and so does the lab simulator
(`kiln labs simulate`). What kiln sends is strict (`extra="forbid"`): a lab may refuse anything it does not know.
What a lab sends kiln (slots, bookings, callbacks) ignores fields it does not know: a lab that adds its own fields
must not have a valid, signed callback refused and retried forever.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, model_validator

# Standard Webhooks' three headers on every callback, and how far a callback's timestamp may be from the receiver's
# clock (either way) before it is refused as stale: the replay window
WEBHOOK_ID_HEADER = "webhook-id"
WEBHOOK_TIMESTAMP_HEADER = "webhook-timestamp"
WEBHOOK_SIGNATURE_HEADER = "webhook-signature"
WEBHOOK_TOLERANCE_S = 300
# the header kiln sends with POST /bookings; the same key books once
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"


def _utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


# a time with its offset (naive times are refused: a lab and kiln may sit in different zones), read as UTC
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]


class BookingStatus(str, Enum):
    """Where a booking is at the lab."""

    BOOKED = "booked"
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


# a booking in one of these changes no more: DELETE answers 409, no callback follows
FINAL_BOOKING_STATUSES = frozenset({BookingStatus.COMPLETED, BookingStatus.FAILED, BookingStatus.CANCELLED})


class CallbackStatus(str, Enum):
    """What a callback tells kiln: a booking's new status, or progress while it runs."""

    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_CALLBACK_STATUSES = frozenset({CallbackStatus.COMPLETED, CallbackStatus.FAILED, CallbackStatus.CANCELLED})


class _Window(BaseModel):
    """A time window of one resource; its end after its start."""

    resource: str = Field(min_length=1, max_length=200, description="The lab's resource (an instrument, a robot).")
    start: UtcDatetime = Field(description="When the window starts (ISO 8601 with an offset; read as UTC).")
    end: UtcDatetime = Field(description="When the window ends (ISO 8601 with an offset; read as UTC), after start.")

    @model_validator(mode="after")
    def _ends_after_it_starts(self) -> _Window:
        if self.end <= self.start:
            raise ValueError(f"end: {self.end.isoformat()} is not after start {self.start.isoformat()}")
        return self


class Slot(_Window):
    """A free window of one resource, as GET /slots answers it."""

    model_config = ConfigDict(extra="ignore")


class SlotList(BaseModel):
    """GET /slots: the free windows within the window asked for, earliest first."""

    model_config = ConfigDict(extra="ignore")

    slots: list[Slot] = Field(description="Free windows, earliest first, each clipped to the from/to asked for.")
    next: UtcDatetime | None = Field(
        None, description="Set when the list was cut at `limit`: ask again with this as `from` for the rest.",
    )


class BookingRequest(_Window):
    """POST /bookings: what kiln asks a lab to book, sent with an Idempotency-Key header."""

    model_config = ConfigDict(extra="forbid")

    protocol: dict[str, Any] = Field(
        default_factory=dict, description="What the lab should do in the window; kiln passes the user's as is.",
    )
    callback_url: str = Field(
        pattern=r"^https?://\S+$", max_length=2000,
        description="Where the lab POSTs the booking's signed callbacks (kiln's /api/v1/hooks/labs/{lab}).",
    )
    reference: str = Field(min_length=1, max_length=200, description="kiln's job id, for the lab's records.")


class Booking(_Window):
    """A booking as the lab answers it: POST /bookings, GET and DELETE /bookings/{id}."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=200, description="The lab's booking id.")
    status: BookingStatus = Field(description="Where the booking is: booked, started, completed, failed, cancelled.")
    results: dict[str, Any] | None = Field(None, description="What the run produced, once completed.")
    message: str | None = Field(None, description="The lab's words on the status: why it failed or was cancelled.")
    reference: str | None = Field(None, description="The reference kiln gave when it booked (kiln's job id).")
    updated_at: UtcDatetime = Field(description="When the status last changed (ISO 8601, UTC).")


class Progress(BaseModel):
    """How far a running booking is."""

    model_config = ConfigDict(extra="ignore")

    fraction: float | None = Field(None, ge=0, le=1, description="The share of the run done, 0 to 1.")
    message: str | None = Field(None, max_length=2000, description="What the lab is doing now.")


class Callback(BaseModel):
    """The body a lab POSTs to kiln's callback_url, signed per Standard Webhooks.

    A lab delivers at least once and not necessarily in order: kiln keeps the first delivery of each webhook-id and
    booking, and reads `sequence` to tell a late callback from a new one.
    """

    model_config = ConfigDict(extra="ignore")

    booking: str = Field(min_length=1, max_length=200, description="The lab's booking id.")
    status: CallbackStatus = Field(description="started, progress, completed, failed or cancelled.")
    results: dict[str, Any] | None = Field(None, description="What the run produced (with completed).")
    message: str | None = Field(None, description="The lab's words: why it failed or was cancelled.")
    progress: Progress | None = Field(None, description="How far the run is (with progress).")
    sequence: StrictInt = Field(
        ge=1, description="1, 2, 3 … per booking, in the order the lab emitted them: a lower one arriving after a "
        "higher one was reordered on the way.",
    )
    at: UtcDatetime = Field(description="When the lab emitted it (ISO 8601, UTC).")


LabErrorCode = Literal[
    "unauthorized", "invalid_request", "unknown_resource", "idempotency_key_missing", "idempotency_key_reused",
    "slot_taken", "not_found", "already_final", "unavailable",
]


class LabError(BaseModel):
    """Every error a lab answers: a code kiln acts on, and words for a person."""

    model_config = ConfigDict(extra="ignore")

    error: str = Field(description="What went wrong, as a code (LabErrorCode for the lab protocol's own).")
    message: str = Field(description="What went wrong and what to do, naming the field or header at fault.")
    field: str | None = Field(None, description="The field, query parameter or header at fault.")
    booking: Booking | None = Field(
        None, description="The booking concerned: the one an Idempotency-Key already made (idempotency_key_reused), "
        "the final one DELETE found (already_final).",
    )
