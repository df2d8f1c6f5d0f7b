"""What the executor in a Dask process does with a run it is handed, before it starts it."""

from __future__ import annotations

from uuid import uuid4

from prefect.client.schemas.objects import FlowRun
from prefect.states import Cancelled, Pending, Running, Scheduled

from kiln.worker.executor import PROCESS_DIED, _instead_of_starting


def run_in(state) -> FlowRun:
    return FlowRun(flow_id=uuid4(), state=state)


def test_a_pending_or_scheduled_run_is_started():
    assert _instead_of_starting(run_in(Pending())) is None
    assert _instead_of_starting(run_in(Scheduled())) is None
    assert _instead_of_starting(run_in(None)) is None


def test_a_run_that_ended_while_it_waited_keeps_its_final_state():
    cancelled = Cancelled(message="cancelled by a user")
    assert _instead_of_starting(run_in(cancelled)) is cancelled


def test_a_running_run_was_started_by_a_process_that_died_and_crashes_instead_of_running_twice():
    # an existing Dask cluster's scheduler hands the task of a dead worker to another (allowed-failures)
    state = _instead_of_starting(run_in(Running()))
    assert state.is_crashed() and state.message == PROCESS_DIED
