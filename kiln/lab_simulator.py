"""A lab that speaks kiln's lab protocol (README, "The lab protocol") from memory, with switches for every fault.

`kiln labs simulate` serves it. Bookings run in lab time, `time_scale` times faster than the wall clock: at 3600 a
booking that starts in two hours starts after 2 s and its 60 minutes take 1 s. Callbacks carry wall-clock times and
are signed now, as a real lab's would be. The `/_sim/...` endpoints are the simulator's own (not the protocol's):
they change the switches on a running simulator, cancel a booking on the lab's side and list every callback attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import random
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.schemas.labs import (
    FINAL_BOOKING_STATUSES,
    FINAL_CALLBACK_STATUSES,
    IDEMPOTENCY_KEY_HEADER,
    WEBHOOK_TOLERANCE_S,
    Booking,
    BookingRequest,
    BookingStatus,
    Callback,
    CallbackStatus,
    LabError,
    Progress,
    Slot,
    SlotList,
)
from kiln.webhooks import new_secret, secret_key, sign

# documented test values, used when no key or secret is given: the simulator is a test tool and prints neither
DEFAULT_API_KEY = "lab-sim-key"
DEFAULT_SECRET = "whsec_a2lsbiBsYWIgc2ltdWxhdG9yIHRlc3Qgc2VjcmV0"
DEFAULT_RESOURCES = ("xrd-1", "furnace-1", "synth-1")
# a booking may start this far in the past (the caller read the slot a moment before it booked)
PAST_START_GRACE = timedelta(seconds=WEBHOOK_TOLERANCE_S)
MAX_SLOTS = 1000


class SimConfig(BaseModel):
    """The simulator's switches. POST /_sim/config replaces them whole: a switch left out goes back to its default.

    A rate is the chance, 0 to 1, that the fault hits one callback (or one booking, where it says so); 1 hits every
    one, and `seed` makes the draws between repeatable.
    """

    model_config = ConfigDict(extra="forbid")

    time_scale: float = Field(3600.0, gt=0, le=1e7, description="Lab seconds per wall-clock second.")
    progress_steps: int = Field(2, ge=0, le=100, description="progress callbacks between started and the outcome.")
    duplicate_rate: float = Field(0, ge=0, le=1, description="Callbacks delivered a second time (same webhook-id).")
    reorder_rate: float = Field(
        0, ge=0, le=1, description="Bookings whose callbacks are held until the outcome, then delivered last first "
        "(the outcome before started, progress after the outcome).",
    )
    callback_delay_s: float = Field(0, ge=0, le=3600, description="Wall seconds each callback waits before it is sent.")
    callback_jitter_s: float = Field(0, ge=0, le=3600, description="Up to this many more, drawn per callback.")
    lost_rate: float = Field(0, ge=0, le=1, description="Callbacks never sent (only GET /bookings/{id} tells).")
    booking_failures: int = Field(
        0, ge=0, le=100, description="The first N POST /bookings attempts of each Idempotency-Key fail with a 5xx.",
    )
    booking_failure_mode: Literal["before_booking", "after_booking"] = Field(
        "before_booking", description="before_booking: 503, nothing booked. after_booking: the booking is made, then "
        "the answer is lost (500); a retry with the same key gets it.",
    )
    forged_rate: float = Field(
        0, ge=0, le=1, description="Callbacks preceded by a copy signed with a wrong key (same webhook-id).",
    )
    stale_rate: float = Field(
        0, ge=0, le=1, description="Callbacks preceded by a copy signed `stale_by_s` ago (a replay; same webhook-id).",
    )
    stale_by_s: float = Field(600, ge=0, le=10**7, description="How old a stale copy's timestamp is.")
    mutated_rate: float = Field(
        0, ge=0, le=1, description="Callbacks preceded by a copy whose body was changed after signing (status "
        "completed, results replaced; same webhook-id and signature).",
    )
    rotation_secret: str | None = Field(
        None, description="A new signing secret (whsec_…) the lab signs with too: two signatures in each header.",
    )
    fail_rate: float = Field(0, ge=0, le=1, description="Bookings whose run ends `failed` rather than completed.")
    race_rate: float = Field(
        0, ge=0, le=1, description="POST /bookings that find their window taken by another client a moment before "
        "(409, and the window is gone from GET /slots).",
    )
    blocked: list[Slot] = Field(
        default_factory=list, description="Windows already booked by others: GET /slots leaves them out, POST 409s.",
    )
    retry_base_s: float = Field(
        0.2, ge=0, le=3600, description="Wall seconds before a callback without a 2xx is retried, doubling each time.",
    )
    retry_attempts: int = Field(6, ge=1, le=50, description="Attempts of one callback before the lab gives up.")
    seed: int | None = Field(None, description="Seeds the draws of the rates; none draws afresh.")

    @field_validator("rotation_secret")
    @classmethod
    def _a_secret(cls, value: str | None) -> str | None:
        if value is not None:
            secret_key(value)
        return value

    def shown(self) -> dict[str, Any]:
        """The switches as GET /_sim/config shows them: a secret only as whether it is set."""
        data = self.model_dump(mode="json")
        data["rotation_secret"] = "set" if self.rotation_secret else None
        return data


DeliveryKind = Literal["genuine", "duplicate", "forged", "stale", "mutated", "lost"]


class Delivery(BaseModel):
    """One attempt to deliver a callback, and what the receiver answered."""

    booking: str = Field(description="The booking the callback is about.")
    webhook_id: str = Field(description="The callback's webhook-id (the same across retries, duplicates and copies).")
    sequence: int = Field(description="The callback's sequence within its booking.")
    status: CallbackStatus = Field(description="The callback's status.")
    kind: DeliveryKind = Field(
        description="genuine (a retry too), duplicate, a forged/stale/mutated copy, or lost (never sent).",
    )
    attempt: int = Field(description="1 for the first attempt of this kind, 2 for its first retry …")
    sent_at: datetime | None = Field(description="When it was sent (null when lost).")
    answer: int | None = Field(description="The HTTP status the receiver answered; null when lost or unreachable.")
    error: str | None = Field(None, description="Why no answer came (connection refused, timeout).")


class _Run:
    """A booking the lab holds, with the request that made it and the tasks that run it and deliver its callbacks."""

    def __init__(self, booking: Booking, request: BookingRequest):
        self.booking = booking
        self.request = request
        self.sequence = itertools.count(1)
        self.outbox: asyncio.Queue[Callback] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.deliverer: asyncio.Task | None = None


def _error(status: int, code: str, message: str, *, field: str | None = None,
           booking: Booking | None = None) -> JSONResponse:  # fmt: skip
    body = LabError(error=code, message=message, field=field, booking=booking).model_dump(mode="json")
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _problem(error: ValidationError) -> tuple[str | None, str]:
    """(field, message) for the first problem pydantic found, the field named first: 'end: …'."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return (field or None), (message if not field or message.startswith(f"{field}:") else f"{field}: {message}")


def _overlaps(a_start: datetime, a_end: datetime, b_start: datetime, b_end: datetime) -> bool:
    return a_start < b_end and b_start < a_end


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _hm(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC")


class LabSimulator:
    """The lab's state: resources, bookings, switches, and the log of callback deliveries."""

    def __init__(self, *, api_key: str, secret: str, resources: list[str], config: SimConfig):
        secret_key(secret)  # a malformed secret stops the simulator at start, not at its first callback
        self.api_key = api_key
        self.secret = secret
        self.resources = list(dict.fromkeys(resources))
        self.config = config
        self.rng = random.Random(config.seed)
        self.runs: dict[str, _Run] = {}
        self.by_key: dict[str, str] = {}  # Idempotency-Key → booking id
        self.attempts: dict[str, int] = {}  # Idempotency-Key → POST /bookings attempts seen
        self.taken_by_others: list[Slot] = []  # windows lost to other clients in a race
        self.deliveries: list[Delivery] = []
        self.ids = itertools.count(1)
        self.client: httpx.AsyncClient | None = None

    # the switches

    def configure(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)

    def draw(self, rate: float) -> bool:
        return rate >= 1 or (rate > 0 and self.rng.random() < rate)

    def _lab_seconds(self, wall: float) -> float:
        return wall / self.config.time_scale

    # the protocol

    def authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def busy(self, resource: str) -> list[tuple[datetime, datetime]]:
        """The windows of `resource` no one else can book: live bookings, blocked windows, windows lost in a race."""
        windows = [(run.booking.start, run.booking.end) for run in self.runs.values()
                   if run.booking.resource == resource and run.booking.status != BookingStatus.CANCELLED]  # fmt: skip
        windows += [(slot.start, slot.end) for slot in [*self.config.blocked, *self.taken_by_others]
                    if slot.resource == resource]  # fmt: skip
        return sorted(windows)

    def free(self, resource: str, start: datetime, end: datetime, min_length: timedelta) -> list[Slot]:
        """The gaps between busy windows of `resource` within [start, end): no horizon but the caller's."""
        slots, cursor = [], start
        for busy_start, busy_end in self.busy(resource) + [(end, end)]:
            if busy_start > cursor and min(busy_start, end) - cursor >= max(min_length, timedelta(microseconds=1)):
                slots.append(Slot(resource=resource, start=cursor, end=min(busy_start, end)))
            cursor = max(cursor, busy_end)
            if cursor >= end:
                break
        return slots

    def conflict(self, request: BookingRequest) -> tuple[datetime, datetime] | None:
        for busy_start, busy_end in self.busy(request.resource):
            if _overlaps(request.start, request.end, busy_start, busy_end):
                return busy_start, busy_end
        return None

    def book(self, request: BookingRequest, key: str) -> _Run:
        booking_id = f"B-{next(self.ids)}"
        booking = Booking(id=booking_id, resource=request.resource, start=request.start, end=request.end,
                          status=BookingStatus.BOOKED, reference=request.reference, updated_at=_now())  # fmt: skip
        run = self.runs[booking_id] = _Run(booking, request)
        self.by_key[key] = booking_id
        run.task = asyncio.create_task(self._run(run))
        run.deliverer = asyncio.create_task(self._deliver_all(run))
        return run

    def end(self, run: _Run, status: BookingStatus, message: str) -> None:
        """A booking ends now, from outside its run (the client's DELETE, the lab's cancel)."""
        if run.task is not None:
            run.task.cancel()
        self._set(run, status, message=message)
        self._emit(run, CallbackStatus(status.value), message=message)

    # a booking's run, in lab time

    def _set(self, run: _Run, status: BookingStatus, *, results: dict | None = None, message: str | None = None):
        run.booking = run.booking.model_copy(
            update={"status": status, "results": results, "message": message, "updated_at": _now()}
        )

    def _emit(self, run: _Run, status: CallbackStatus, **fields: Any) -> None:
        run.outbox.put_nowait(Callback(booking=run.booking.id, status=status, sequence=next(run.sequence), at=_now(),
                                       **fields))  # fmt: skip

    async def _run(self, run: _Run) -> None:
        booking = run.booking
        await asyncio.sleep(self._lab_seconds(max(0.0, (booking.start - _now()).total_seconds())))
        self._set(run, BookingStatus.STARTED)
        self._emit(run, CallbackStatus.STARTED)
        steps = self.config.progress_steps
        step = self._lab_seconds((booking.end - booking.start).total_seconds()) / (steps + 1)
        for done in range(1, steps + 1):
            await asyncio.sleep(step)
            fraction = round(done / (steps + 1), 4)
            self._emit(run, CallbackStatus.PROGRESS,
                       progress=Progress(fraction=fraction, message=f"step {done} of {steps + 1}"))  # fmt: skip
        await asyncio.sleep(step)
        if self.draw(self.config.fail_rate):
            message = f"{booking.resource} stopped at step {steps + 1} of {steps + 1}: sample holder jammed (simulated)"
            self._set(run, BookingStatus.FAILED, message=message)
            self._emit(run, CallbackStatus.FAILED, message=message)
        else:
            results = self._results(run)
            self._set(run, BookingStatus.COMPLETED, results=results)
            self._emit(run, CallbackStatus.COMPLETED, results=results)

    @staticmethod
    def _results(run: _Run) -> dict[str, Any]:
        """What the run measured: the protocol echoed, with a checksum a test can recompute."""
        request = run.request
        canonical = json.dumps(request.protocol, sort_keys=True, separators=(",", ":"))
        return {
            "resource": request.resource,
            "reference": request.reference,
            "protocol": request.protocol,
            "checksum": hashlib.sha256(canonical.encode()).hexdigest(),
            "duration_minutes": round((request.end - request.start).total_seconds() / 60, 3),
        }

    # callbacks, at least once and not always in order

    async def _deliver_all(self, run: _Run) -> None:
        """Delivers the booking's callbacks one after another until its outcome's; retries each until a 2xx."""
        held = []
        reorder = self.draw(self.config.reorder_rate)
        while True:
            callback = await run.outbox.get()
            final = callback.status in FINAL_CALLBACK_STATUSES
            if reorder:
                held.append(callback)
                if final:
                    for each in reversed(held):
                        await self._deliver(run, each)
            else:
                await self._deliver(run, callback)
            if final:
                return

    async def _deliver(self, run: _Run, callback: Callback) -> None:
        config = self.config
        webhook_id = f"msg_{run.booking.id}_{callback.sequence}_{self.rng.getrandbits(48):012x}"
        delay = config.callback_delay_s + (self.rng.uniform(0, config.callback_jitter_s) if config.callback_jitter_s
                                           else 0)  # fmt: skip
        if delay:
            await asyncio.sleep(delay)
        if self.draw(config.lost_rate):
            self._record(run, callback, webhook_id, "lost", 1, None, None)
            return
        url, body = run.request.callback_url, callback.model_dump_json().encode()
        # an attacker's copies go first and share the genuine webhook-id: a receiver that marks an id as seen before
        # it verifies the signature would then drop the genuine callback
        if self.draw(config.forged_rate):
            await self._post(run, callback, webhook_id, "forged", 1, url, body, sign(new_secret(), webhook_id, body))
        if self.draw(config.stale_rate):
            stamp = int(_now().timestamp() - config.stale_by_s)
            headers = sign(self._secrets(), webhook_id, body, timestamp=stamp)
            await self._post(run, callback, webhook_id, "stale", 1, url, body, headers)
        if self.draw(config.mutated_rate):
            mutated = callback.model_copy(update={"status": CallbackStatus.COMPLETED, "results": {"tampered": True}})
            headers = sign(self._secrets(), webhook_id, body)
            await self._post(run, callback, webhook_id, "mutated", 1, url, mutated.model_dump_json().encode(), headers)
        for attempt in range(1, config.retry_attempts + 1):
            answer = await self._post(run, callback, webhook_id, "genuine", attempt, url, body,
                                      sign(self._secrets(), webhook_id, body))  # fmt: skip
            if answer is not None and 200 <= answer < 300:
                break
            if attempt < config.retry_attempts:
                await asyncio.sleep(config.retry_base_s * 2 ** (attempt - 1))
        else:
            return
        if self.draw(config.duplicate_rate):
            await self._post(run, callback, webhook_id, "duplicate", 1, url, body,
                             sign(self._secrets(), webhook_id, body))  # fmt: skip

    def _secrets(self) -> list[str]:
        """The secrets each callback is signed with: the new one first while a key is rotated."""
        return [self.config.rotation_secret, self.secret] if self.config.rotation_secret else [self.secret]

    async def _post(self, run: _Run, callback: Callback, webhook_id: str, kind: DeliveryKind, attempt: int, url: str,
                    body: bytes, headers: dict[str, str]) -> int | None:  # fmt: skip
        sent_at, answer, error = _now(), None, None
        try:
            response = await self.client.post(url, content=body,
                                              headers={**headers, "content-type": "application/json"})  # fmt: skip
            answer = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        self._record(run, callback, webhook_id, kind, attempt, sent_at, answer, error)
        return answer

    def _record(self, run: _Run, callback: Callback, webhook_id: str, kind: DeliveryKind, attempt: int,
                sent_at: datetime | None, answer: int | None, error: str | None = None) -> None:  # fmt: skip
        self.deliveries.append(Delivery(booking=run.booking.id, webhook_id=webhook_id, sequence=callback.sequence,
                                        status=callback.status, kind=kind, attempt=attempt, sent_at=sent_at,
                                        answer=answer, error=error))  # fmt: skip


def _parse_time(request: Request, name: str) -> datetime:
    value = request.query_params.get(name)
    if value is None:
        raise _Refused(_error(422, "invalid_request", f"{name}: required (an ISO 8601 time with an offset)",
                              field=name))  # fmt: skip
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise _Refused(_error(422, "invalid_request", f"{name}: {value[:60]!r} is not an ISO 8601 time with an offset "
                              "(2026-05-01T14:00:00Z)", field=name))  # fmt: skip
    return parsed.astimezone(timezone.utc)


class _Refused(Exception):
    """Carries an error answer out of a helper."""

    def __init__(self, response: JSONResponse):
        self.response = response


def create_app(lab: LabSimulator) -> FastAPI:
    """The simulator as an ASGI app: the lab protocol, and the /_sim endpoints."""

    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(timeout=10, headers={"user-agent": "kiln-lab-simulator"}) as client:
            lab.client = client
            yield
            for run in lab.runs.values():
                for task in (run.task, run.deliverer):
                    if task is not None:
                        task.cancel()

    app = FastAPI(title="kiln lab simulator", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def bearer_key(request: Request, call_next):
        if request.url.path == "/_sim/health" or lab.authorized(request):
            return await call_next(request)
        return _error(401, "unauthorized", "Authorization: send 'Bearer <the lab's API key>'", field="Authorization")

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused):
        return exc.response

    @app.get("/_sim/health")
    async def health():
        return {"status": "ok"}

    @app.get("/slots")
    async def slots(request: Request):
        asked = request.query_params.getlist("resource") or lab.resources
        unknown = [name for name in asked if name not in lab.resources]
        if unknown:
            return _error(422, "unknown_resource", f"resource: {unknown[0]!r} is not a resource of this lab; it has "
                          f"{', '.join(lab.resources)}", field="resource")  # fmt: skip
        start, end = _parse_time(request, "from"), _parse_time(request, "to")
        if end <= start:
            return _error(422, "invalid_request", "to: must be after from", field="to")
        try:
            limit = int(request.query_params.get("limit", "100"))
            min_minutes = float(request.query_params.get("min_minutes", "0"))
        except ValueError:
            return _error(422, "invalid_request", "limit, min_minutes: numbers", field="limit")
        if not 1 <= limit <= MAX_SLOTS or min_minutes < 0:
            return _error(422, "invalid_request", f"limit: 1 to {MAX_SLOTS}; min_minutes: 0 or more", field="limit")
        start = max(start, _now())  # a window in the past is no use to anyone
        found = sorted((slot for name in asked for slot in lab.free(name, start, end, timedelta(minutes=min_minutes))),
                       key=lambda slot: (slot.start, slot.resource))  # fmt: skip
        page = SlotList(slots=found[:limit], next=found[limit].start if len(found) > limit else None)
        return page.model_dump(mode="json")

    @app.post("/bookings")
    async def create_booking(request: Request):
        key = request.headers.get(IDEMPOTENCY_KEY_HEADER, "").strip()
        if not key or len(key) > 255:
            return _error(400, "idempotency_key_missing", f"{IDEMPOTENCY_KEY_HEADER}: send a key of 1 to 255 "
                          "characters; the same key books once", field=IDEMPOTENCY_KEY_HEADER)  # fmt: skip
        try:
            asked = BookingRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            field, message = _problem(exc)
            return _error(422, "invalid_request", message, field=field)
        config = lab.config
        # from here to the answer nothing awaits: under the one event loop a request's checks and its booking are
        # atomic, so of two racing for one window exactly one books it
        attempt = lab.attempts[key] = lab.attempts.get(key, 0) + 1
        failing = attempt <= config.booking_failures
        if failing and config.booking_failure_mode == "before_booking":
            return _error(503, "unavailable", f"the lab is busy (simulated failure {attempt} of "
                          f"{config.booking_failures}); retry with the same {IDEMPOTENCY_KEY_HEADER}")  # fmt: skip
        if key in lab.by_key:
            run = lab.runs[lab.by_key[key]]
            if run.request != asked:
                return _error(422, "idempotency_key_reused", f"{IDEMPOTENCY_KEY_HEADER}: this key already "
                              f"booked {run.booking.id} with a different request; use a new key for a new "
                              "booking", field=IDEMPOTENCY_KEY_HEADER, booking=run.booking)  # fmt: skip
            if failing:
                return _error(500, "unavailable", "the answer was lost (simulated)")
            return JSONResponse(run.booking.model_dump(mode="json"), status_code=200)
        if asked.resource not in lab.resources:
            return _error(422, "unknown_resource", f"resource: {asked.resource!r} is not a resource of this lab; "
                          f"it has {', '.join(lab.resources)}", field="resource")  # fmt: skip
        if asked.start < _now() - PAST_START_GRACE:
            return _error(422, "invalid_request", f"start: {_hm(asked.start)} is in the past; ask GET /slots for "
                          "a free window", field="start")  # fmt: skip
        if lab.conflict(asked) is None and lab.draw(config.race_rate):
            lab.taken_by_others.append(Slot(resource=asked.resource, start=asked.start, end=asked.end))
        taken = lab.conflict(asked)
        if taken is not None:
            return _error(409, "slot_taken", f"start: {asked.resource} is booked from {_hm(taken[0])} to "
                          f"{_hm(taken[1])}, which overlaps the window asked for; ask GET /slots for a free one",
                          field="start")  # fmt: skip
        run = lab.book(asked, key)
        if failing:
            return _error(500, "unavailable", "the booking was made but the answer was lost (simulated); retry "
                          f"with the same {IDEMPOTENCY_KEY_HEADER}")  # fmt: skip
        return JSONResponse(run.booking.model_dump(mode="json"), status_code=201)

    def find(booking_id: str) -> _Run:
        run = lab.runs.get(booking_id)
        if run is None:
            raise _Refused(_error(404, "not_found", f"booking: no booking {booking_id[:60]!r} at this lab",
                                  field="booking"))  # fmt: skip
        return run

    def cancel(booking_id: str, message: str) -> JSONResponse:
        run = find(booking_id)
        if run.booking.status in FINAL_BOOKING_STATUSES:
            return _error(409, "already_final", f"booking: {booking_id} is already {run.booking.status.value}",
                          field="booking", booking=run.booking)  # fmt: skip
        lab.end(run, BookingStatus.CANCELLED, message)
        return JSONResponse(run.booking.model_dump(mode="json"))

    @app.get("/bookings/{booking_id}")
    async def get_booking(booking_id: str):
        return find(booking_id).booking.model_dump(mode="json")

    @app.delete("/bookings/{booking_id}")
    async def delete_booking(booking_id: str):
        return cancel(booking_id, "cancelled at the client's request")

    @app.get("/_sim/config")
    async def get_config():
        return lab.config.shown()

    @app.post("/_sim/config")
    async def set_config(request: Request):
        try:
            lab.configure(SimConfig.model_validate_json(await request.body() or b"{}"))
        except ValidationError as exc:
            field, message = _problem(exc)
            return _error(422, "invalid_request", message, field=field)
        return lab.config.shown()

    @app.post("/_sim/bookings/{booking_id}/cancel")
    async def lab_cancel(booking_id: str):
        return cancel(booking_id, f"cancelled by the lab: {find(booking_id).booking.resource} is down for "
                      "maintenance (simulated)")  # fmt: skip

    @app.get("/_sim/bookings")
    async def all_bookings():
        return {"bookings": [run.booking.model_dump(mode="json") for run in lab.runs.values()]}

    @app.get("/_sim/deliveries")
    async def deliveries(booking: str | None = None):
        shown = [d for d in lab.deliveries if booking is None or d.booking == booking]
        return {"deliveries": [d.model_dump(mode="json") for d in shown]}

    return app
