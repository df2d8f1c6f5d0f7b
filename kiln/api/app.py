"""The kiln API process: the FastAPI app, with the dispatcher and the event relay running beside it (in the leading
process, when several share a PostgreSQL job index: kiln.store.coordination)."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prefect.client.orchestration import get_client
from prefect.context import AsyncClientContext
from starlette.exceptions import HTTPException

from kiln.api.batches import router as batches_router
from kiln.api.compute import router as compute_router
from kiln.api.contract import AllowedMethods, contract_openapi, error_responses, one_value_per_query_parameter
from kiln.api.files import router as files_router
from kiln.api.hpc import router as hpc_router
from kiln.api.jobs import router as jobs_router
from kiln.api.mcp import router as mcp_router
from kiln.api.llm import Gateway
from kiln.api.llm import install as install_llm
from kiln.api.models import router as models_router
from kiln.api.labs import router as labs_router
from kiln.api.plugins import router as plugins_router
from kiln.store.llm import reconcile_holds
from kiln.submission import RateLimiter
from kiln.dispatch.dispatcher import Dispatcher
from kiln.dispatch.labs import LabWatch
from kiln.errors import ErrorBody, KilnError, RateLimited, ServerError
from kiln.events.job_events import emit_job_event
from kiln.events.relay import Relay
from kiln.registry import available_job_types
from kiln.settings import KilnSettings, get_settings
from kiln.store.coordination import Coordination
from kiln.store.store import Store

log = logging.getLogger("kiln.api")


async def wait_for_prefect(client, timeout: float = 120) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await client.api_healthcheck() is None:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the Prefect API at {client.api_url} did not answer within {timeout:g} s")
        await asyncio.sleep(0.5)


class SharedPrefectClient:
    """ASGI middleware: a Prefect call made while serving a request (get_client(), a block's aload, as when a
    plugin_exec job's plugin is read at submission) uses the process's one client instead of opening its own.

    A client of its own is a new httpx client and TLS context at every call: a plugin_exec job's POST took 50 to
    100 ms longer at the p50 with it, on the 2-core machine under load (bench/plugin_exec.py).
    """

    def __init__(self, app, api: FastAPI):
        self.app = app
        self.api = api

    async def __call__(self, scope, receive, send):
        prefect = getattr(self.api.state, "prefect", None)  # set while the lifespan holds it
        if scope["type"] in ("http", "websocket") and prefect is not None:
            # each request runs in a task of its own, with a copy of the context: this sets it for this request only
            AsyncClientContext.__var__.set(prefect)
        await self.app(scope, receive, send)


def create_app(settings: KilnSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from kiln.run_reports import run_key

        store = Store(settings.job_index_url)
        await store.migrate()
        await reconcile_holds(store)
        store.transition_listeners.append(emit_job_event)
        store.crash_reruns = {name: jt.crash_reruns for name, jt in available_job_types().items() if jt.crash_reruns}
        async with get_client() as client:
            await wait_for_prefect(client)
        # the process's one Prefect client: the dispatcher's, the relay's, and (SharedPrefectClient) that of every
        # Prefect call made while serving a request
        async with AsyncClientContext() as prefect:
            client = prefect.client
            app.state.prefect = prefect
            dispatcher = Dispatcher(store, client, settings)
            await dispatcher.start()
            lab_watch = LabWatch(store, client, settings)
            relay = Relay(store, client, dispatcher, settings, labs=lab_watch)
            app.state.rate_limiter = RateLimiter()
            app.state.llm = Gateway(store, client)
            app.state.settings, app.state.store, app.state.dispatcher, app.state.relay = (
                settings,
                store,
                dispatcher,
                relay,
            )
            app.state.labs = lab_watch
            app.state.run_key = run_key(settings)

            async def lead() -> None:
                await asyncio.gather(dispatcher.run(), relay.run(), relay.watch(), lab_watch.run())

            # a job submitted or cancelled through another kiln API wakes this one's dispatcher, when it leads
            app.state.coordination = Coordination(store, lead, heard=dispatcher.wake)
            task = asyncio.create_task(app.state.coordination.run())
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await app.state.llm.close()
                await store.close()
                app.state.prefect = None  # about to close

    app = FastAPI(
        title="kiln",
        version="1",
        description="A unified compute-job platform for materials science, built on Prefect 3.",
        lifespan=lifespan,
        dependencies=[Depends(one_value_per_query_parameter)],
    )

    # every error answer carries ErrorBody: kiln's own errors, request validation, and Starlette's 404s
    @app.exception_handler(KilnError)
    async def kiln_error(request: Request, exc: KilnError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, RateLimited) else None
        return JSONResponse(exc.body().model_dump(mode="json"), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            location = ".".join(str(p) for p in error["loc"] if p not in ("body",))
            parts.append(f"{location}: {error['msg']}")
        errors = json.loads(json.dumps(exc.errors(), default=str))
        return JSONResponse(ErrorBody(detail="; ".join(parts), errors=errors).model_dump(mode="json"), status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; the API's routes are listed at /docs"
        return JSONResponse(ErrorBody(detail=str(detail)).model_dump(mode="json"), status_code=exc.status_code,
                            headers=exc.headers)  # fmt: skip

    @app.get(
        "/healthz",
        summary="Liveness, whether this process leads, and whether Prefect's events reach the relay",
        responses=error_responses(ServerError),
    )
    async def healthz(request: Request) -> dict:
        state = request.app.state
        workers = await state.dispatcher.capacity()
        leading = state.coordination.leading
        return {
            "status": "ok",
            # whether this process runs the dispatcher and the relay (one kiln API of several on PostgreSQL does)
            "leader": leading,
            # whether Prefect's events reach this process's relay; null where another process leads
            "prefect_events": state.relay.connected.is_set() if leading else None,
            "workers": len(workers.workers),
            "worker_names": [w.name for w in workers.workers],
            # each worker's process: a new instance under the same name is that worker restarted
            "worker_instances": {w.name: w.instance for w in workers.workers},
            # the plugin sandbox each worker offers, best first: A (runc, cgroups), B (bubblewrap); none is []
            "sandbox_tiers": {w.name: w.offers.get("sandbox_tiers", []) for w in workers.workers},
            "slots": workers.slots,
            # batch slots held by released jobs; a suspended job (a lab booking waiting for its lab) holds none
            "busy_slots": min(workers.busy, workers.slots),
            # batch jobs released beyond the slots, waiting in Prefect for the next free one, and their bound
            "released_ahead": workers.waiting,
            "release_ahead": workers.ahead,
            "suspended_jobs": await state.store.suspended_count(),
            "job_types": sorted(state.dispatcher.deployments),
        }

    app.include_router(batches_router)
    app.include_router(jobs_router)
    app.include_router(mcp_router)
    app.include_router(files_router)
    app.include_router(models_router)
    app.include_router(hpc_router)
    app.include_router(plugins_router)
    app.include_router(labs_router)
    app.include_router(compute_router)
    install_llm(app)
    # the registered job types (kiln's own and other packages') are the request body's union
    app.openapi = contract_openapi(app, available_job_types())
    app.add_middleware(AllowedMethods, api=app)
    app.add_middleware(SharedPrefectClient, api=app)
    return app
