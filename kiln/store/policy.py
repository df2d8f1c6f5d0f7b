"""Who may move a job's status: kiln's one owner of job state, as an ordered table of named rules.

Every change of a job's status is a Proposal: the API (a user's cancel), the dispatcher (a timeout),
the relay (a state of the job's flow run, as Prefect reports it) and the worker-loss watch all propose,
and `decide` answers. The first rule with an opinion decides; a proposal no rule objects to is applied.
Prefect is the engine of record: a state of the job's own flow run is never contradicted, except where
a rule below says why. The job index (kiln.store.store.Store.transition) carries the verdict out.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from kiln.schemas.statuses import FINAL_STATUSES, JobStatus

# a job moves forward through these; a late report of an earlier stage changes nothing
_RANK = {JobStatus.PENDING: 0, JobStatus.QUEUED: 1, JobStatus.RUNNING: 2, JobStatus.MERGING: 3}


class Source(str, Enum):
    """Who proposes a move."""

    PREFECT = "prefect"  # a state of the job's flow run, mirrored by the relay
    KILN = "kiln"  # kiln's own decision: a timeout, a lost worker, a refused batch
    USER = "user"  # a request through the kiln API


class Action(str, Enum):
    APPLY = "apply"  # move the job to the proposed status
    IGNORE = "ignore"  # leave it as it is
    RETRY = "retry"  # back to pending for another attempt
    REOPEN = "reopen"  # a finished job runs again: its run was restarted in Prefect
    SUSPEND = "suspend"  # the job stays running, its run suspended: it holds no worker slot while it waits
    RESUME = "resume"  # a suspended job's run was taken by a worker again: it holds a slot again
    CANCEL = "cancel"  # end it cancelled, not as proposed: the user asked for that first


@dataclass(frozen=True)
class Job:
    """What the rules read of a job."""

    status: JobStatus
    flow_run_id: str | None = None
    cancel_requested: bool = False
    # a subflow of its parent's run; its retries are its parent's
    in_parent_run: bool = False
    attempt: int = 1
    max_retry_count: int = 0
    completed_at: datetime | None = None
    # it serves until cancelled (JobType.persistent)
    persistent: bool = False
    # when its run was suspended (Prefect Paused: a lab booking waiting for the lab); None while a worker holds it
    suspended_at: datetime | None = None
    # attempts it has beyond max_retry_count when a run crashes (JobType.crash_reruns)
    crash_reruns: int = 0


@dataclass(frozen=True)
class Proposal:
    to: JobStatus
    source: Source
    # the flow run whose state this is (PREFECT proposals)
    flow_run_id: str | None = None
    # when the state was entered
    at: datetime | None = None
    # the run crashed (its worker or process died, kiln stopped it): it did not fail by itself
    crashed: bool = False
    # the run is suspended (Prefect Paused, `suspend_flow_run`): it left its worker and waits to be resumed
    suspended: bool = False
    # the run is scheduled (Prefect Scheduled): no worker has taken it yet (a suspended run being resumed)
    scheduled: bool = False


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str
    why: str = ""


class Rule(ABC):
    """One named rule: `applies` says whether it has an opinion on the proposal, `action` what it is."""

    action: Action = Action.IGNORE

    @abstractmethod
    def applies(self, job: Job, proposal: Proposal) -> bool:
        """Whether the rule decides this proposal."""

    def decide(self, job: Job, proposal: Proposal) -> Decision:
        return Decision(self.action, type(self).__name__, (type(self).__doc__ or "").strip().splitlines()[0])


class ReportOfAnotherRun(Rule):
    """A state of a flow run the job no longer runs on (an earlier attempt's) changes nothing."""

    # A job back in pending for its next attempt runs on no flow run yet: a second report of the crash that sent
    # it back (the relay's own crash of an orphan, and the Crashed event Prefect sends of it) is of another run,
    # not a second failure to count against max_retry_count.

    def applies(self, job, proposal):
        return (
            proposal.source is Source.PREFECT
            and proposal.flow_run_id is not None
            and job.flow_run_id != proposal.flow_run_id
        )


class CacheHitsAreFinal(Rule):
    """A cache hit ran nothing and has no run of its own: nothing moves it."""

    def applies(self, job, proposal):
        return job.status is JobStatus.CACHE_HIT


def _of_its_own_run(job: Job, proposal: Proposal) -> bool:
    """The proposal is a state of the flow run the job runs on."""
    return proposal.source is Source.PREFECT and job.flow_run_id is not None and proposal.flow_run_id == job.flow_run_id


def _after_its_end(job: Job, proposal: Proposal) -> bool:
    """The state was entered after the job ended (not a late report of the run's earlier life)."""
    return job.completed_at is not None and proposal.at is not None and proposal.at > job.completed_at


class RunRestartedInPrefect(Rule):
    """A finished job whose own flow run is scheduled or running again (Retry in the Prefect UI) runs again."""

    action = Action.REOPEN

    def applies(self, job, proposal):
        return (
            job.status in FINAL_STATUSES
            and proposal.to in _RANK
            and _of_its_own_run(job, proposal)
            and _after_its_end(job, proposal)
        )


class CompletedRunIsCompleted(Rule):
    """A job whose own flow run completed is completed, whatever kiln decided before (Prefect is the record)."""

    action = Action.APPLY

    def applies(self, job, proposal):
        return (
            proposal.to is JobStatus.COMPLETED
            and job.status is not JobStatus.COMPLETED
            and _of_its_own_run(job, proposal)
            # a finished job is overruled only by a completion after its end, not by a replay of an older one
            and (job.completed_at is None or _after_its_end(job, proposal))
        )


class FinalIsFinal(Rule):
    """A finished job stays as it ended."""

    def applies(self, job, proposal):
        return job.status in FINAL_STATUSES


class SuspendedRunHoldsNoSlot(Rule):
    """A job whose own run suspended itself (Prefect Paused: a lab booking waiting for the lab's results) stays
    running, and holds no worker slot and no process while it waits: the dispatcher does not count it, and no lost
    worker crashes it."""

    action = Action.SUSPEND

    def applies(self, job, proposal):
        return (
            proposal.suspended
            and job.suspended_at is None
            and job.status not in FINAL_STATUSES
            and _of_its_own_run(job, proposal)
        )


class ResumedRunTakesASlot(Rule):
    """A suspended job whose own run a worker took again (resumed: Pending, Running or beyond) holds a slot again.
    While the resumed run is only scheduled it still holds none, and waits for a worker like a queued job."""

    action = Action.RESUME

    def applies(self, job, proposal):
        return (
            job.suspended_at is not None
            and not proposal.suspended
            and not proposal.scheduled
            and proposal.to in _RANK
            and _of_its_own_run(job, proposal)
            and (proposal.at is None or proposal.at > job.suspended_at)
        )


class ForwardOnly(Rule):
    """An unfinished job only moves forward (pending → queued → running → merging): a late report is stale."""

    def applies(self, job, proposal):
        return proposal.to in _RANK and _RANK[proposal.to] <= _RANK[job.status]


class CancelRequestedWaitsForCancelled(Rule):
    """A job the user cancelled is not failed by its run's crash on its way down: its Cancelled state follows, with
    the cancel's reason."""

    def applies(self, job, proposal):
        return job.cancel_requested and proposal.source is Source.PREFECT and proposal.to is JobStatus.FAILED and (
            proposal.crashed
        )


class CancelRequestedWins(Rule):
    """A job the user cancelled ends cancelled when its run fails: it may have failed by itself just before the cancel
    reached Prefect, and then no Cancelled state follows."""

    action = Action.CANCEL

    def applies(self, job, proposal):
        return job.cancel_requested and proposal.source is Source.PREFECT and proposal.to is JobStatus.FAILED


class PersistentJobsServeAgain(Rule):
    """A persistent job whose run crashed (its worker killed, kiln restarted) runs again, however often: a service
    ends only when it is cancelled or fails by itself."""

    action = Action.RETRY

    def applies(self, job, proposal):
        return (
            job.persistent
            and proposal.to is JobStatus.FAILED
            and proposal.source is Source.PREFECT
            and proposal.crashed
            and not job.in_parent_run
            and not job.cancel_requested
        )


class RetryWhilePolicyAllows(Rule):
    """A failed attempt of a top-level job runs again while its max_retry_count allows, and a crashed one also while
    its type's crash_reruns do (a lab booking, safe to run again)."""

    action = Action.RETRY

    def applies(self, job, proposal):
        return (
            proposal.to is JobStatus.FAILED
            and proposal.source is Source.PREFECT
            and not job.in_parent_run
            and not job.cancel_requested
            and job.attempt <= job.max_retry_count + (job.crash_reruns if proposal.crashed else 0)
        )


# in order: the first rule that applies decides
RULES: tuple[Rule, ...] = (
    ReportOfAnotherRun(),
    CacheHitsAreFinal(),
    RunRestartedInPrefect(),
    CompletedRunIsCompleted(),
    FinalIsFinal(),
    SuspendedRunHoldsNoSlot(),
    ResumedRunTakesASlot(),
    ForwardOnly(),
    CancelRequestedWaitsForCancelled(),
    CancelRequestedWins(),
    PersistentJobsServeAgain(),
    RetryWhilePolicyAllows(),
)


def decide(job: Job, proposal: Proposal) -> Decision:
    """What becomes of the proposal: the first rule that applies decides; otherwise it is applied."""
    for rule in RULES:
        if rule.applies(job, proposal):
            return rule.decide(job, proposal)
    return Decision(Action.APPLY, "Accepted")
