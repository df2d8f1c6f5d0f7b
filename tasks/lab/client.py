"""kiln's client of the lab protocol (README, "The lab protocol"): slots, bookings, asking, cancelling.

The API key goes in the Authorization header and nowhere else: errors quote the lab's answer, never the request.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import httpx
from pydantic import ValidationError

from kiln.schemas.labs import IDEMPOTENCY_KEY_HEADER, Booking, BookingRequest, LabError, SlotList

log = logging.getLogger("kiln.labs")

# how often, and after how long, a 5xx or an unreachable lab is asked again when booking (doubling: 0.5 … 8 s)
BOOK_ATTEMPTS = 6
BOOK_BACKOFF_S = 0.5


class LabAnswer(Exception):
    """A lab's refusal or failure: its HTTP status, its error code (LabError.error) and its words."""

    def __init__(self, lab: str, status: int | None, code: str, message: str, booking: Booking | None = None):
        super().__init__(f"lab {lab!r}: {message}" + (f" (HTTP {status}, {code})" if status else f" ({code})"))
        self.lab, self.status, self.code, self.message, self.booking = lab, status, code, message, booking

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status >= 500 or self.status == 429


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


class LabClient:
    """One lab's API, with its key."""

    def __init__(self, name: str, base_url: str, api_key: str, timeout: float = 10.0):
        self.name = name
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout,
                                       headers={"Authorization": f"Bearer {api_key}"})  # fmt: skip

    @classmethod
    def of(cls, name: str, lab, timeout: float = 10.0) -> "LabClient":
        """The client of a registered lab (kiln.blocks.lab.Lab)."""
        return cls(name, lab.base_url, lab.api_key.get_secret_value(), timeout)

    async def __aenter__(self) -> "LabClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise LabAnswer(self.name, None, "unreachable", f"no answer from {self._http.base_url}{path}: "
                            f"{type(exc).__name__}: {exc}") from None  # fmt: skip
        if response.status_code >= 400:
            raise self._refusal(response)
        return response

    def _refusal(self, response: httpx.Response) -> LabAnswer:
        try:
            error = LabError.model_validate_json(response.content)
            return LabAnswer(self.name, response.status_code, error.error, error.message, error.booking)
        except ValidationError:
            text = response.text[:300].strip() or response.reason_phrase
            return LabAnswer(self.name, response.status_code, "http_error", text)

    async def slots(self, resource: str | None, start: datetime, end: datetime | None, *,
                    min_minutes: float = 0, limit: int = 100) -> SlotList:
        """GET /slots: free windows of the resource (every resource when None) between start and end."""
        params: dict[str, Any] = {"from": _iso(start), "limit": limit}
        if resource is not None:
            params["resource"] = resource
        if end is not None:
            params["to"] = _iso(end)
        if min_minutes:
            params["min_minutes"] = min_minutes
        return SlotList.model_validate_json((await self._call("GET", "/slots", params=params)).content)

    async def book(self, request: BookingRequest, key: str) -> Booking:
        """POST /bookings with the Idempotency-Key: the same key books once. A 5xx or no answer is asked again with
        the same key (the booking may have been made and only its answer lost), BOOK_ATTEMPTS times in all."""
        body = request.model_dump_json().encode()
        for attempt in range(1, BOOK_ATTEMPTS + 1):
            try:
                response = await self._call("POST", "/bookings", content=body, headers={
                    IDEMPOTENCY_KEY_HEADER: key, "Content-Type": "application/json"})  # fmt: skip
                return Booking.model_validate_json(response.content)
            except LabAnswer as answer:
                if not answer.retryable or attempt == BOOK_ATTEMPTS:
                    raise
                log.warning("booking at %s failed (attempt %d of %d): %s; asking again", self.name, attempt,
                            BOOK_ATTEMPTS, answer)  # fmt: skip
                await asyncio.sleep(BOOK_BACKOFF_S * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def booking(self, booking_id: str) -> Booking:
        """GET /bookings/{id}: where the booking is, and its results once it has them."""
        return Booking.model_validate_json((await self._call("GET", f"/bookings/{booking_id}")).content)

    async def cancel(self, booking_id: str) -> Booking:
        """DELETE /bookings/{id}."""
        return Booking.model_validate_json((await self._call("DELETE", f"/bookings/{booking_id}")).content)
