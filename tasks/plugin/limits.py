"""What a sandboxed plugin may use, how a run ended, and the sandbox's errors: a limit refused, a sandbox broken."""

from __future__ import annotations

from enum import Enum

from kiln.errors import InvalidRequest, ServerError
from kiln.schemas.plugins import Limits

__all__ = ["Ending", "LimitUnenforceable", "Limits", "SandboxFailed"]


class Ending(str, Enum):
    """How a run ended; exactly one per run, its `reason` the words a user reads."""

    COMPLETED = "completed"
    OUT_OF_MEMORY = "out_of_memory"
    TOO_MANY_PROCESSES = "too_many_processes"
    OUTPUT_TOO_LARGE = "output_too_large"
    CPU_TIME_LIMIT = "cpu_time_limit"
    WALL_TIME_LIMIT = "wall_time_limit"
    EXIT_CODE = "exit_code"
    CANCELLED = "cancelled"

    @classmethod
    def of_hits(cls, hits: set[str]) -> Ending | None:
        """The ending of a run that hit these limits (of "memory", "pids", "output", "cpu"), the first of
        LIMIT_ENDINGS when several; None when it hit none."""
        return next((LIMIT_ENDINGS[hit] for hit in LIMIT_ENDINGS if hit in hits), None)

    def reason(self, limits: Limits, exit_code: int | None = None) -> str:
        """'out of memory (limit 256 MB)', 'exited with code 3', …"""
        return {
            Ending.COMPLETED: "completed",
            Ending.OUT_OF_MEMORY: f"out of memory (limit {limits.memory_mb} MB)",
            Ending.TOO_MANY_PROCESSES: f"too many processes (limit {limits.pids})",
            Ending.OUTPUT_TOO_LARGE: f"output larger than {limits.output_mb} MB",
            Ending.CPU_TIME_LIMIT: "cpu time limit",
            Ending.WALL_TIME_LIMIT: f"wall time limit ({limits.wall_seconds:g} s)",
            Ending.EXIT_CODE: f"exited with code {exit_code}",
            Ending.CANCELLED: "cancelled",
        }[self]


# the limits a run can hit, in the order their endings win when it hit several
LIMIT_ENDINGS = {"memory": Ending.OUT_OF_MEMORY, "pids": Ending.TOO_MANY_PROCESSES, "output": Ending.OUTPUT_TOO_LARGE,
                 "cpu": Ending.CPU_TIME_LIMIT}  # fmt: skip


class LimitUnenforceable(InvalidRequest):
    """A limit this worker's sandbox tier cannot enforce; the run is refused rather than run without it."""

    def __init__(self, limit: str, tier: str, why: str, remedy: str = "run it on a worker that offers tier A"):
        super().__init__(
            f"limits.{limit}: sandbox tier {tier} on this worker cannot enforce it ({why}); {remedy}",
            details=[{"loc": ["limits", limit], "msg": why, "type": "limit_unenforceable", "tier": tier}],
        )
        self.limit = limit


class SandboxFailed(ServerError):
    """The sandbox itself could not be set up or torn down on this worker; the message says which step."""
