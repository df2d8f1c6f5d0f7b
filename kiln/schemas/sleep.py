"""Input of the `sleep` job: the platform's own diagnostic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SleepInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=86400, description="How long to sleep.")
    children: int = Field(
        0, ge=0, le=100, description="Child sleep jobs to run as subflows, each sleeping as long, one after another."
    )
    fail: bool = Field(False, description="End failed after sleeping (for testing failure and retry paths).")

    def estimated_hours(self) -> float:
        """What the job runs for, children included: the quota's estimate."""
        return self.seconds * (1 + self.children) / 3600
