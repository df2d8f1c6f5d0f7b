"""What runs inside a warm Dask worker process: one flow run at a time, with its flow kept loaded."""

from __future__ import annotations

import asyncio
import ctypes
import importlib
import threading
from uuid import UUID

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


def execute_flow_run(flow_run_id: str, module: str, function: str, timeout_seconds: float | None) -> dict:
    """Runs the pre-created flow run to its end in this process; returns its final state's type and message."""
    from prefect.client.orchestration import get_client
    from prefect.context import _deployment_id
    from prefect.flow_engine import run_flow_async, run_flow_sync

    flow = load_flow(module, function)
    if timeout_seconds:
        flow = flow.with_options(timeout_seconds=timeout_seconds)

    async def read_run():
        async with get_client() as client:
            return await client.read_flow_run(UUID(flow_run_id))

    loop = asyncio.new_event_loop()
    try:
        flow_run = loop.run_until_complete(read_run())
        # With a deployment id on the run, Prefect's engine opens a websocket observer of external
        # suspension requests per run and waits for it, about 125 ms of every job's start (measured in
        # bench/latency.py). kiln suspends no runs from outside; it cancels them through the worker.
        # The deployment stays on the run in Prefect and in prefect.runtime.deployment.
        _deployment_id.set(flow_run.deployment_id)
        flow_run = flow_run.model_copy(update={"deployment_id": None})
        if flow.isasync:
            task = loop.create_task(
                run_flow_async(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
            )
            _RUNNING[flow_run_id] = ("async", loop, task)
            state = loop.run_until_complete(task)
        else:
            _RUNNING[flow_run_id] = ("sync", threading.get_ident())
            state = run_flow_sync(flow, flow_run=flow_run, parameters=flow_run.parameters, return_type="state")
    except (asyncio.CancelledError, RunCancelled):
        return {"state": "CANCELLED", "message": "stopped by the kiln worker"}
    finally:
        _RUNNING.pop(flow_run_id, None)
        loop.close()
    return {"state": state.type.value, "message": state.message}


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
