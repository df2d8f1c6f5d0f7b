"""kiln's exceptions, shared by the service and the SDK.

    KilnError                    every error kiln raises on purpose
    ├── InvalidRequest  (400)    the request cannot be run as sent
    │   └── UnknownJobType       the type is not one this platform runs
    ├── Unauthorized    (401)    no key, or a key that is unknown or revoked
    ├── QuotaExceeded   (402)    the project's core-hour budget cannot cover the request
    ├── NotFound        (404)    no such object in the caller's project
    ├── Conflict        (409)    the object is in a state that forbids the change
    ├── TooLarge        (413)    more entries or bytes than one request may carry
    ├── InputInvalid    (422)    a field of the input is wrong
    ├── RateLimited     (429)    too many requests; `retry_after` seconds until the next is taken
    ├── ServerError     (5xx)    the platform failed; the message says where
    └── JobFailed                (SDK) a job the caller waited on did not complete

Every error answer of the API, whatever its status, carries one body: ErrorBody.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """The body of every error answer of the API (4xx and 5xx), and what the SDK reads into a KilnError."""

    detail: str = Field(
        description="What was wrong and what to do, starting with the field when one is at fault: "
        "'input.seconds: Input should be greater than or equal to 0'."
    )
    errors: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The individual problems, each with `loc` (the field's path), `msg` and `type` as pydantic "
        "reports them; empty when `detail` says it all.",
    )


class KilnError(Exception):
    """Every error kiln raises on purpose; `status_code` is its HTTP status."""

    status_code: int = 500

    def __init__(self, message: str, *, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> ErrorBody:
        """The error as the API answers it."""
        errors = self.details if isinstance(self.details, list) else [] if self.details is None else [self.details]
        return ErrorBody(detail=self.message, errors=errors)


class InvalidRequest(KilnError):
    """The request cannot be run as sent."""

    status_code = 400


class UnknownJobType(InvalidRequest):
    """The job type is not one this platform runs."""

    def __init__(self, job_type: str, available: list[str]):
        super().__init__(
            f"type: unknown job type {job_type!r}; available types: {', '.join(sorted(available))}",
            details=[{"loc": ["type"], "msg": f"unknown job type {job_type!r}", "type": "unknown_job_type",
                      "available_types": sorted(available)}],
        )


class Unauthorized(KilnError):
    """No API key, or one that is unknown or revoked."""

    status_code = 401


class Forbidden(KilnError):
    """The request comes from where it may not: a browser page of another origin."""

    status_code = 403


class QuotaExceeded(KilnError):
    """The project's core-hour budget cannot cover the request."""

    status_code = 402


class NotFound(KilnError):
    """No such object in the caller's project."""

    status_code = 404

    @classmethod
    def job(cls, job_id: str) -> NotFound:
        return cls(f"job {job_id} not found")


class Conflict(KilnError):
    """The object is in a state that forbids the change."""

    status_code = 409


class InputInvalid(KilnError):
    """A field of the request is wrong."""

    status_code = 422


class TooLarge(KilnError):
    """More entries or bytes than one request may carry."""

    status_code = 413


class RateLimited(KilnError):
    """Too many requests of one kind from one key; the next is taken after `retry_after` seconds."""

    status_code = 429

    def __init__(self, message: str, *, retry_after: int = 1, details: Any = None):
        super().__init__(message, details=details)
        self.retry_after = retry_after


class ServerError(KilnError):
    """The platform failed; the message says where."""

    status_code = 500


class JobFailed(KilnError):
    """A job the caller waited on ended failed or cancelled."""

    def __init__(self, job: Any):
        super().__init__(f"job {job.id} ended {job.status.value}: {job.status_reason or 'no reason given'}")
        self.job = job


ERRORS_BY_STATUS = {
    cls.status_code: cls
    for cls in (InvalidRequest, Unauthorized, QuotaExceeded, NotFound, Conflict, TooLarge, InputInvalid, RateLimited)
}


def error_for_status(status: int, message: str, *, details: Any = None, retry_after: int = 1) -> KilnError:
    """The exception of an HTTP error answer, its status_code that status; a 5xx without a class of its own is a
    ServerError, any other status without one a plain KilnError."""
    cls = ERRORS_BY_STATUS.get(status) or (ServerError if status >= 500 else KilnError)
    error = cls(message, details=details)
    error.status_code = status
    if isinstance(error, RateLimited):
        error.retry_after = retry_after
    return error
