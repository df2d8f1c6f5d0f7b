"""kiln's one owner of job state, rule by rule: each rule's case, and the case just outside it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kiln.schemas import JobStatus
from kiln.store.models import utcnow
from kiln.store.policy import RULES, Action, Job, Proposal, Source, decide

NOW = utcnow()
ENDED = NOW - timedelta(seconds=10)
PREFECT, KILN, USER = Source.PREFECT, Source.KILN, Source.USER
S = JobStatus


def run_state(status: JobStatus, run: str = "run-1", at=NOW) -> Proposal:
    return Proposal(status, PREFECT, run, at)


def test_every_rule_has_a_name_and_says_why():
    for rule in RULES:
        assert (type(rule).__doc__ or "").strip(), type(rule).__name__


def test_report_of_another_run_is_ignored():
    job = Job(S.RUNNING, flow_run_id="run-2", attempt=2)
    assert decide(job, run_state(S.COMPLETED, "run-1")).rule == "ReportOfAnotherRun"
    assert decide(job, run_state(S.COMPLETED, "run-2")).action is Action.APPLY
    # back in pending for its next attempt, on no run yet: the crash that sent it back, reported a second time
    retried = Job(S.PENDING, flow_run_id=None, attempt=2, max_retry_count=1)
    assert decide(retried, Proposal(S.FAILED, PREFECT, "run-1", NOW, crashed=True)).rule == "ReportOfAnotherRun"
    # kiln's own word on a job with no run is no report of a run
    assert decide(retried, Proposal(S.CANCELLED, USER)).action is Action.APPLY


def test_cache_hits_are_final():
    assert decide(Job(S.CACHE_HIT), Proposal(S.CANCELLED, USER)).rule == "CacheHitsAreFinal"


def test_run_restarted_in_prefect_reopens_a_finished_job():
    job = Job(S.FAILED, flow_run_id="run-1", completed_at=ENDED)
    assert decide(job, run_state(S.QUEUED)).action is Action.REOPEN
    assert decide(job, run_state(S.RUNNING)).action is Action.REOPEN
    # a late report of the run's first life is older than the job's end
    assert decide(job, run_state(S.RUNNING, at=ENDED - timedelta(seconds=1))).rule == "FinalIsFinal"
    # kiln itself never reopens a job
    assert decide(job, Proposal(S.QUEUED, KILN)).rule == "FinalIsFinal"


def test_a_completed_run_makes_its_job_completed_even_after_kiln_failed_it():
    job = Job(S.FAILED, flow_run_id="run-1", completed_at=ENDED)
    decision = decide(job, run_state(S.COMPLETED))
    assert (decision.action, decision.rule) == (Action.APPLY, "CompletedRunIsCompleted")
    # a replay of a completion from before kiln ended the job (a refused batch run) does not
    assert decide(job, run_state(S.COMPLETED, at=ENDED - timedelta(seconds=1))).rule == "FinalIsFinal"
    # nor does kiln's own word
    assert decide(job, Proposal(S.COMPLETED, KILN)).rule == "FinalIsFinal"


@pytest.mark.parametrize("to", [S.FAILED, S.CANCELLED, S.RUNNING])
def test_final_is_final(to):
    job = Job(S.COMPLETED, flow_run_id="run-1", completed_at=ENDED)
    assert decide(job, Proposal(to, KILN)).rule == "FinalIsFinal"
    assert decide(job, run_state(to, at=ENDED - timedelta(seconds=1))).rule == "FinalIsFinal"


@pytest.mark.parametrize("current, to", [(S.RUNNING, S.QUEUED), (S.RUNNING, S.RUNNING), (S.MERGING, S.RUNNING),
                                         (S.QUEUED, S.PENDING)])
def test_forward_only(current, to):
    assert decide(Job(current, flow_run_id="run-1"), run_state(to)).rule == "ForwardOnly"


def test_forward_moves_apply():
    assert decide(Job(S.QUEUED, flow_run_id="run-1"), run_state(S.RUNNING)).action is Action.APPLY
    assert decide(Job(S.RUNNING, flow_run_id="run-1"), run_state(S.MERGING)).action is Action.APPLY


def test_a_cancel_requested_wins_over_the_runs_failure_on_its_way_down():
    job = Job(S.RUNNING, flow_run_id="run-1", cancel_requested=True, max_retry_count=3)
    # crashed on its way down: its Cancelled state, with the cancel's reason, is to come
    crashed = Proposal(S.FAILED, PREFECT, "run-1", NOW, crashed=True)
    assert (decide(job, crashed).rule, decide(job, crashed).action) == ("CancelRequestedWaitsForCancelled",
                                                                        Action.IGNORE)  # fmt: skip
    # failed by itself before the cancel reached Prefect: no Cancelled state comes, and it ends cancelled now
    decision = decide(job, run_state(S.FAILED))
    assert (decision.rule, decision.action) == ("CancelRequestedWins", Action.CANCEL)
    assert decide(job, run_state(S.CANCELLED)).action is Action.APPLY
    # kiln's own failure (a timeout, which requests the cancel itself) still ends it failed
    assert decide(job, Proposal(S.FAILED, KILN)).action is Action.APPLY


def test_retry_while_policy_allows():
    job = Job(S.RUNNING, flow_run_id="run-1", attempt=1, max_retry_count=1)
    assert decide(job, run_state(S.FAILED)).action is Action.RETRY
    assert decide(Job(S.RUNNING, flow_run_id="run-2", attempt=2, max_retry_count=1),
                  run_state(S.FAILED, "run-2")).action is Action.APPLY  # fmt: skip
    # a child in its parent's run retries with its parent
    assert decide(Job(S.RUNNING, flow_run_id="run-1", max_retry_count=1, in_parent_run=True),
                  run_state(S.FAILED)).action is Action.APPLY  # fmt: skip
    # kiln's own failure (a timeout) is not retried
    assert decide(job, Proposal(S.FAILED, KILN)).action is Action.APPLY


def test_a_crashed_run_of_a_type_with_crash_reruns_runs_again_that_many_times_more():
    crashed = Proposal(S.FAILED, PREFECT, "run-1", NOW, crashed=True)
    booking = Job(S.RUNNING, flow_run_id="run-1", attempt=1, crash_reruns=2)
    assert (decide(booking, crashed).rule, decide(booking, crashed).action) == ("RetryWhilePolicyAllows", Action.RETRY)
    assert decide(Job(S.RUNNING, flow_run_id="run-1", attempt=2, crash_reruns=2), crashed).action is Action.RETRY
    # past them it fails; and a failure of the flow itself (the lab's "failed") is not run again for them
    assert decide(Job(S.RUNNING, flow_run_id="run-1", attempt=3, crash_reruns=2), crashed).action is Action.APPLY
    assert decide(booking, run_state(S.FAILED)).action is Action.APPLY


def test_a_persistent_job_whose_run_crashed_serves_again_however_often():
    crashed = Proposal(S.FAILED, PREFECT, "run-1", NOW, crashed=True)
    service = Job(S.RUNNING, flow_run_id="run-1", attempt=7, persistent=True)
    assert (decide(service, crashed).rule, decide(service, crashed).action) == ("PersistentJobsServeAgain", Action.RETRY)
    # one that failed by itself fails; one cancelled, or a batch job, is not served again
    assert decide(service, run_state(S.FAILED)).action is Action.APPLY
    assert decide(Job(S.RUNNING, flow_run_id="run-1", persistent=True, cancel_requested=True), crashed).action \
        is Action.IGNORE  # fmt: skip
    assert decide(Job(S.RUNNING, flow_run_id="run-1", attempt=7), crashed).action is Action.APPLY


def test_a_suspended_run_keeps_its_job_running_and_frees_its_slot():
    job = Job(S.RUNNING, flow_run_id="run-1")
    paused = Proposal(S.RUNNING, PREFECT, "run-1", NOW, suspended=True)
    assert decide(job, paused).action is Action.SUSPEND
    # a Paused state seen before its Running (a missed event) suspends a queued job too
    assert decide(Job(S.QUEUED, flow_run_id="run-1"), paused).action is Action.SUSPEND
    # a second sight of it, or another run's, changes nothing
    assert decide(Job(S.RUNNING, flow_run_id="run-1", suspended_at=ENDED), paused).rule == "ForwardOnly"
    assert decide(Job(S.RUNNING, flow_run_id="run-2"), paused).rule == "ReportOfAnotherRun"
    late = Proposal(S.RUNNING, PREFECT, "run-1", ENDED - timedelta(seconds=1), suspended=True)
    assert decide(Job(S.CANCELLED, flow_run_id="run-1", completed_at=ENDED), late).rule == "FinalIsFinal"


def test_a_resumed_run_takes_a_slot_when_a_worker_takes_it():
    job = Job(S.RUNNING, flow_run_id="run-1", suspended_at=ENDED)
    # scheduled again (Resuming): no worker holds it yet
    assert decide(job, Proposal(S.QUEUED, PREFECT, "run-1", NOW, scheduled=True)).rule == "ForwardOnly"
    assert decide(job, Proposal(S.QUEUED, PREFECT, "run-1", NOW)).action is Action.RESUME  # Pending: taken
    assert decide(job, run_state(S.RUNNING)).action is Action.RESUME
    # a report older than the suspension is stale
    assert decide(job, run_state(S.RUNNING, at=ENDED - timedelta(seconds=1))).rule == "ForwardOnly"
    # its end while suspended (a cancel) is applied
    assert decide(job, run_state(S.CANCELLED)).action is Action.APPLY
