"""What runs inside a warm Dask worker process: one flow run at a time, with its flow kept loaded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import importlib
import threading
from uuid import UUID

from prefect.exceptions import Pause

from kiln.job_inputs import passed_through, resolve_parameters

# (module, function) → flow; the import, and whatever the module loads at import, stays warm
_FLOWS: dict[tuple[str, str], object] = {}
# flow run id → how to stop it: ("async", loop, task) or ("sync", thread id)
_RUNNING: dict[str, tuple] = {}


class RunCancelled(BaseException):
    """Raised into a synchronous flow's thread to stop it; BaseException so user code does not swallow it."""


def load_flow(module: str, function: str):
    key = (module, function)
    if key not in _FLOWS:
        _FLOWS[key] = getattr(importlib.import_module(module), function)
    return _FLOWS[key]


def warm_up(modules: list[str]) -> list[str]:
    """Imports Prefect and the flow modules ahead of the first job; returns what it imported."""
    import prefect.flow_engine  # noqa: F401

    for module in modules:
        importlib.import_module(module)
    return modules


class _Runner:
    """This process's event loop for async flows, in a thread of its own, with one Prefect client.

    A loop and a client per run cost about 60 ms of every job's start (two clients, each loading the
    CA bundle, measured in bench/latency.py); Prefect's engine reuses an AsyncClientContext it finds
    on the running loop.
    """

    def __init__(self) -> None:
        from prefect.context import AsyncClientContext

        self.loop = asyncio.new_event_loop()
        self.client_context = AsyncClientContext()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.client_context.__aenter__())
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, name="kiln-runner", daemon=True).start()
        ready.wait()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


_runner: _Runner | None = None


def _shared_runner() -> _Runner:
    global _runner
    if _runner is None:
        _runner = _Runner()
    return _runner


def _without_deployment(flow_run):
    """The run as the engine should see it: with its deployment id in the context, not on the run.

    With a deployment id on the run, Prefect's engine opens a websocket observer of external
    suspension requests for every run and waits for it: about 125 ms of every job's start
    (measured in bench/latency.py). kiln suspends no runs from outside; it cancels them through the
    worker. The run keeps its deployment in Prefect, and prefect.runtime.deployment still reads it.
    """
    from prefect.context import _deployment_id

    _deployment_id.set(flow_run.deployment_id)
    return flow_run.model_copy(update={"deployment_id": None})


# a run's Dask process died under it (kiln.worker.worker says the same when Dask reports the death)
PROCESS_DIED = "the Dask worker process running this job died (killed, or out of memory)"


def _instead_of_starting(flow_run):
    """The state to end with instead of starting the run here, or None to start it.

    A run that ended before its process came to start it (cancelled, or crashed by kiln while it waited for a Dask
    process) keeps its final state: Prefect's engine would take it from there and run it after all. A run already
    Running was started by a Dask process that died: on an existing cluster the scheduler runs the task again on
    another worker (Dask's allowed-failures is that cluster's setting, 3 by default; kiln sets 0 on its own
    LocalCluster only). A job is not run twice behind kiln's back: it crashes, and its retry policy decides.
    """
    from prefect.states import Crashed

    if flow_run.state is None:
        return None
    if flow_run.state.is_final():
        return flow_run.state
    if flow_run.state.is_running():
        return Crashed(message=PROCESS_DIED)
    return None


def execute_flow_run(flow_run_id: str, module: str, function: str, timeout_seconds: float | None,
                     fans_out: bool = False, report_to: tuple[str, str] | None = None) -> dict:  # fmt: skip
    """Runs the pre-created flow run to its end in this process; returns its final state's type and message.

    `report_to`, the kiln API's URL and the run's token, sends the run's progress on kiln's own path
    (kiln.run_reports).

    A flow that fans out (JobType.fans_out) runs tasks of its own on this Dask cluster; this thread is handed back
    to Dask while it waits for them, so they can run in this process too instead of waiting for a free one.
    """
    _note_dask_worker(fans_out)
    flow = load_flow(module, function)
    if timeout_seconds:
        flow = flow.with_options(timeout_seconds=timeout_seconds)
    try:
        if flow.isasync:
            runner = _shared_runner()
            state = runner.run(_run_async(runner, flow, flow_run_id, report_to))
        else:
            state = _run_sync(flow, flow_run_id, report_to)
    except (asyncio.CancelledError, concurrent.futures.CancelledError, RunCancelled):
        return {"state": "CANCELLED", "message": "stopped by the kiln worker"}
    except Pause as pause:
        # the flow suspended itself (suspend_flow_run): Prefect's engine re-raises its Pause signal, a BaseException
        # that would otherwise fail the Dask task and take the kiln worker down with it. The run is Paused in Prefect
        # and leaves this process; a resume schedules it again, for any worker.
        return {"state": "PAUSED", "message": pause.state.message if pause.state is not None else None}
    return {"state": state.type.value, "message": state.message}


def _note_dask_worker(fans_out: bool) -> None:
    from distributed import get_worker, secede

    from kiln.runtime import set_dask_scheduler

    try:
        worker = get_worker()
    except ValueError:  # not in a Dask task: the flow runs its tasks in-process
        return
    set_dask_scheduler(worker.scheduler.address)
    if fans_out:
        secede()


async def _run_async(runner: _Runner, flow, flow_run_id: str, report_to: tuple[str, str] | None):
    from prefect.context import AsyncClientContext
    from prefect.flow_engine import run_flow_async

    from kiln.runtime import reporting_to

    # this task's own context: the engine finds the shared client here
    AsyncClientContext.__var__.set(runner.client_context)
    flow_run = _without_deployment(await runner.client_context.client.read_flow_run(UUID(flow_run_id)))
    if (instead := _instead_of_starting(flow_run)) is not None:
        return instead
    parameters = await asyncio.to_thread(resolve_parameters, flow_run.parameters)
    if parameters is not flow_run.parameters:
        flow, parameters = passed_through(flow, parameters)
    _RUNNING[flow_run_id] = ("async", runner.loop, asyncio.current_task())
    try:
        with reporting_to(*(report_to or (None, None))):
            return await run_flow_async(flow, flow_run=flow_run, parameters=parameters, return_type="state")
    finally:
        _RUNNING.pop(flow_run_id, None)


def _run_sync(flow, flow_run_id: str, report_to: tuple[str, str] | None):
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow_sync

    from kiln.runtime import reporting_to

    with get_client(sync_client=True) as client:
        flow_run = _without_deployment(client.read_flow_run(UUID(flow_run_id)))
    if (instead := _instead_of_starting(flow_run)) is not None:
        return instead
    parameters = resolve_parameters(flow_run.parameters)
    if parameters is not flow_run.parameters:
        flow, parameters = passed_through(flow, parameters)
    _RUNNING[flow_run_id] = ("sync", threading.get_ident())
    try:
        with reporting_to(*(report_to or (None, None))):
            return run_flow_sync(flow, flow_run=flow_run, parameters=parameters, return_type="state")
    finally:
        _RUNNING.pop(flow_run_id, None)


def cancel_flow_run(flow_run_id: str) -> bool:
    """Stops the flow run if it runs in this process; True when it did."""
    entry = _RUNNING.get(flow_run_id)
    if entry is None:
        return False
    if entry[0] == "async":
        _, loop, task = entry
        loop.call_soon_threadsafe(task.cancel)
    else:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry[1]), ctypes.py_object(RunCancelled))
    return True
