"""The lab_booking job's input: a slot on a registered lab's resource, the protocol the lab runs in it, and how long
kiln waits for the lab's results."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

# a lab's name, as its block is named (`kiln labs add NAME`)
LAB_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"


class LabBookingInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lab: str = Field(pattern=LAB_NAME, description="A registered lab (`kiln labs list`, GET /api/v1/labs).")
    resource: str = Field(
        min_length=1, max_length=200, description="The lab's resource to book: an instrument or robot it offers "
        "(e.g. 'xrd-1'), one of the lab's `resources`.",
    )
    # ISO 8601 strings, also where Prefect validates the flow's parameter (python mode, where strict takes no string)
    earliest: AwareDatetime | None = Field(
        None, strict=False, description="The booked slot starts at or after this time (ISO 8601 with a zone); now when unset.",
    )
    latest: AwareDatetime | None = Field(
        None, strict=False, description="The booked slot ends at or before this time (ISO 8601 with a zone); the job fails saying "
        "so when no free slot is left before it. No limit when unset.",
    )
    duration_minutes: float = Field(
        gt=0, le=7 * 24 * 60, description="How long a slot the run needs, in minutes (at most a week; 0.5 is 30 s).",
    )
    protocol: dict[str, Any] = Field(
        default_factory=dict, description="What the lab runs in the slot, passed to the lab as it is (its own "
        "format: a synthesis recipe, an XRD scan range, …).",
    )
    deadline_hours: float = Field(
        gt=0, le=24 * 365, description="How long after the booked slot ends kiln waits for the lab's results (by "
        "callback, or by asking the lab) before the job fails, naming the booking and the last thing the lab said.",
    )
    approval: bool = Field(
        False, description="Wait for a person's POST /api/v1/jobs/{id}/approve (or /reject) before anything is "
        "sent to the lab: for bookings prepared by agents.",
    )

    @model_validator(mode="after")
    def _window(self) -> "LabBookingInput":
        if self.earliest is not None and self.latest is not None and self.earliest >= self.latest:
            raise ValueError(f"earliest ({self.earliest.isoformat()}) must be before latest ({self.latest.isoformat()})")
        return self

    def estimated_hours(self) -> float:
        """What the quota holds: the flow holds a worker for seconds (to book, and to finish); while it waits for the
        lab it holds none."""
        return 0.01

    def window(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The times a slot may take: from earliest (or now, when later) to latest."""
        start = max(self.earliest, now) if self.earliest is not None else now
        return start, self.latest
