"""The kiln worker: a Prefect worker type that runs flow runs on a Dask cluster in warm processes."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from functools import lru_cache
from typing import Any, Optional
from uuid import UUID, uuid4

import anyio
import httpx
import psutil
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.events import emit_event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Crashed
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

from kiln.deployments.project import DeploymentSpec
from kiln.worker import executor

log = logging.getLogger("kiln.worker")

HEARTBEAT_EVENT = "kiln.worker.heartbeat"
STOPPED_EVENT = "kiln.worker.stopped"


class KilnWorkerVariables(BaseVariables):
    """A job's resources, as job variables of the kiln work pool."""

    cpu_count: int = Field(0, description="CPU cores the job needs.")
    gpu_count: int = Field(0, description="GPUs the job needs.")
    gpu_name: Optional[str] = Field(None, description="GPU model the job needs.")
    min_ram_gb: float = Field(0, description="Memory in GB the job needs.")
    min_vram_gb: float = Field(0, description="GPU memory in GB the job needs.")
    min_storage_gb: float = Field(0, description="Disk in GB the job needs.")
    max_timeout_run_ms: Optional[int] = Field(None, description="Longest the job may run.")
    max_retry_count: int = Field(0, description="Runs again after a failure (kiln retries them).")
    max_node_count: int = Field(1, description="Most nodes the job may span.")


class KilnJobConfiguration(BaseJobConfiguration):
    cpu_count: int = Field(0)
    gpu_count: int = Field(0)
    gpu_name: Optional[str] = Field(None)
    min_ram_gb: float = Field(0)
    min_vram_gb: float = Field(0)
    min_storage_gb: float = Field(0)
    max_timeout_run_ms: Optional[int] = Field(None)
    max_retry_count: int = Field(0)
    max_node_count: int = Field(1)

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        """Prefect's settings as the environment of a run's infrastructure (kiln's Dask processes have their own).

        Prefect serializes every setting again for every run: a fifth of the kiln worker's CPU in
        bench/batch_submit.py (py-spy), on each job's path from Pending to Running. The settings of a worker
        process do not change, so once is enough; the caller copies the dict.
        """
        return _settings_environment()


@lru_cache(maxsize=1)
def _settings_environment() -> dict[str, str]:
    return BaseJobConfiguration._base_environment()


class RecentReads:
    """What the worker read from the Prefect API in the last few seconds, by the read and its argument.

    Prefect's submission of a run reads its deployment twice (is it still there; its job variables) and its flow
    once: three of the dozen API calls on each job's path, for records that do not change from one run to the next.
    A deployment deleted within `seconds` of its last read is taken as still there; its run starts as it would
    have a moment before. Each caller gets a copy of its own (Prefect merges a run's env into the deployment's).
    """

    def __init__(self, seconds: float = 5.0):
        self.seconds = seconds
        self._read: dict[tuple[str, Any], tuple[float, Any]] = {}

    def wrap(self, read):
        async def read_recent(key):
            at, value = self._read.get((read.__name__, key), (None, None))
            if at is None or time.monotonic() - at > self.seconds:
                value = await read(key)
                self._read[(read.__name__, key)] = (time.monotonic(), value)
            return value.model_copy(deep=True)

        return read_recent


class KilnWorkerResult(BaseWorkerResult):
    """How a flow run ended on the Dask cluster."""


async def force_state(client: PrefectClient, flow_run_id: str | UUID, state):
    """Sets a flow run's state whatever Prefect's orchestration rules say: kiln's way to end or stop a run. Returns
    the state Prefect set (None for a run that is gone)."""
    try:
        return (await client.set_flow_run_state(UUID(str(flow_run_id)), state, force=True)).state
    except ObjectNotFound:
        log.warning("flow run %s vanished before it could be set %s", flow_run_id, state.type)
        return None


def describe_dask_failure(exc: BaseException) -> str:
    """A status_reason for a flow run whose Dask task did not return."""
    name = type(exc).__name__
    if name == "KilledWorker":
        return executor.PROCESS_DIED
    if isinstance(exc, (OSError, asyncio.TimeoutError)) or name in ("CommClosedError", "FutureCancelledError"):
        return f"lost contact with the Dask worker running this job ({name}: {exc})"
    return f"the kiln executor failed: {name}: {exc}"


def mend_local_cluster(cluster, processes: int) -> bool:
    """Starts again the Dask processes a LocalCluster lost for good, and says whether it had to.

    A process the scheduler dropped (a missed heartbeat, a retirement) closes itself, its nanny does not start it
    again, and the cluster forgets it (distributed.deploy.lost-worker-timeout after): a kiln worker left so would
    hold runs it can never start, offering slots no process serves.
    """
    if len(cluster.workers) >= processes:
        return False
    log.warning("%d of the %d Dask processes of this worker are gone; starting them again",
                processes - len(cluster.workers), processes)  # fmt: skip
    cluster.scale(processes)
    return True


def take_within_slots(persistent: list[bool], *, free: int, services_free: int) -> list[int]:
    """Which of the offered runs (each a persistent job's or not, in Prefect's order) a worker takes, by index:
    batch runs while batch slots are free, persistent jobs' runs while service slots are; a run of a full kind is
    passed over, not a stop."""
    room = {False: free, True: services_free}
    taken = []
    for i, kind in enumerate(persistent):
        if room[kind] > 0:
            room[kind] -= 1
            taken.append(i)
    return taken


class KilnWorker(BaseWorker[KilnJobConfiguration, KilnWorkerVariables, KilnWorkerResult]):
    type = "kiln"
    job_configuration = KilnJobConfiguration
    job_configuration_variables = KilnWorkerVariables
    _description = "Runs kiln jobs on a Dask cluster whose worker processes stay warm between jobs."

    def __init__(
        self,
        work_pool_name: str,
        *,
        slots: int,
        service_slots: int = 0,
        scheduler_address: str | None = None,
        dask_workers: int | None = None,
        heartbeat_seconds: float = 2.0,
        **kwargs: Any,
    ):
        # persistent jobs run beside the batch slots, each in a Dask process of its own; Prefect's one limit is
        # their sum, and _submit_scheduled_flow_runs keeps each kind within its count
        super().__init__(work_pool_name, limit=slots + service_slots, create_pool_if_not_found=False, **kwargs)
        self.slots = slots
        self.service_slots = service_slots
        self._scheduler_address = scheduler_address
        self._dask_workers = dask_workers or slots + service_slots
        self._kiln_heartbeat_seconds = heartbeat_seconds
        self._cluster = None
        self._dask = None
        self._running: dict[str, Any] = {}
        # runs taken (Pending) whose start is still on its way: Prefect's submission of a run can outlast
        # KILN_WORKER_LOST_SECONDS under load, and a run no heartbeat lists is crashed as an orphan
        self._taken: set[str] = set()
        # run id → the final state a run reached while it was being submitted here: it is not started
        self._ended_in_submission: dict[str, Any] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._deployments: dict[UUID, DeploymentSpec] = {}
        # run id → whether it is a persistent job's, for the runs this worker holds a slot for
        self._persistent_runs: dict[UUID, bool] = {}
        # one poll at a time chooses runs: the event-woken poll and Prefect's own may overlap
        self._choosing = asyncio.Lock()
        self._background: list[asyncio.Task] = []
        self._poll_now = asyncio.Event()
        # a run that starts is reported at once, so a crash right after still finds its worker
        self._beat_now = asyncio.Event()
        self.instance = str(uuid4())
        self._sandbox_dir = self._sandbox_lock = None
        self._run_key: bytes | None = None
        # the kiln API, told of each run's end (one client: making one loads the CA bundle, about 30 ms)
        self._kiln_api = httpx.AsyncClient(timeout=10)
        self._telling: set[asyncio.Task] = set()

    # lifecycle

    async def setup(self) -> None:
        await super().setup()
        recent = RecentReads()
        self.client.read_deployment = recent.wrap(self.client.read_deployment)
        self.client.read_flow = recent.wrap(self.client.read_flow)
        import dask
        from distributed import Client, LocalCluster

        # a job whose process dies is not re-run behind Prefect's back; kiln's retry policy decides
        dask.config.set({"distributed.scheduler.allowed-failures": 0})
        # Dask's nannies pin numeric libraries to one thread per process; a job owns its process, so
        # give each process its share of the cores (a service waits on I/O: the batch slots share them)
        threads = str(max(1, (os.cpu_count() or 1) // min(self._dask_workers, self.slots)))
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": threads
                         for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
        # ...and leave glibc's malloc its own trim threshold: Dask's 64 KiB returns torch's freed
        # autograd buffers to the kernel on every step, which made a forces pass 2.3x slower
        # (bench/ml_predict.py; 300 structures with forces, 6.3 s against 2.7 s)
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

        await self._claim_sandbox()
        from kiln.run_reports import run_key
        from kiln.settings import get_settings

        self._run_key = run_key(get_settings())
        if self._scheduler_address:
            self._dask = await Client(self._scheduler_address, asynchronous=True)
        else:
            # kiln's own processes: their nanny sees one die at once and starts it again. A heartbeat deadline only
            # drops live ones a loaded machine starved (408 s at a load of 67), and those close for good
            dask.config.set({"distributed.scheduler.worker-ttl": None})
            self._cluster = await LocalCluster(
                n_workers=self._dask_workers,
                threads_per_worker=1,
                processes=True,
                asynchronous=True,
                dashboard_address=None,
                host="127.0.0.1",
            )
            self._dask = await Client(self._cluster, asynchronous=True)
        from kiln.deployments.project import load_project
        from kiln.registry import available_job_types

        modules = sorted({jt.module for jt in available_job_types().values()} |
                         {spec.module for spec in load_project().deployments})  # fmt: skip
        await self._dask.run(executor.warm_up, modules)
        self._background = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._watch_events()),
            asyncio.create_task(self._fast_poll_loop()),
        ]

    async def _claim_sandbox(self) -> None:
        """Claims this worker's folder for plugin runs, cleaning what dead workers left (kill -9 mid-run), and
        hands it to the Dask processes it starts."""
        from kiln.settings import get_settings
        from kiln.tasks.plugin.execute import WORK_DIR_ENV
        from kiln.tasks.plugin.sandbox import claim_work_dir

        self._sandbox_dir, self._sandbox_lock, cleaned = await claim_work_dir(get_settings().sandbox_root,
                                                                              self.instance)  # fmt: skip
        os.environ[WORK_DIR_ENV] = str(self._sandbox_dir)
        if cleaned:
            log.warning("removed %d plugin run(s) that dead workers left behind: %s", len(cleaned), ", ".join(cleaned))

    async def teardown(self, *exc_info: Any) -> None:
        for task in self._background:
            task.cancel()
        try:
            emit_event(STOPPED_EVENT, resource={"prefect.resource.id": f"kiln.worker.{self.name}"})
        except Exception:  # noqa: BLE001 - the API may be gone at shutdown
            pass
        await self._kiln_api.aclose()
        if self._dask is not None:
            await self._dask.close()
        if self._cluster is not None:
            await self._cluster.close()
        if self._sandbox_lock is not None:
            from kiln.tasks.plugin.sandbox import clean_leftovers

            await clean_leftovers(self._sandbox_dir)  # a container is no process of the Dask cluster's
            self._sandbox_lock.close()
            shutil.rmtree(self._sandbox_dir, ignore_errors=True)
        await super().teardown(*exc_info)

    # what the platform sees of this worker

    def offers(self) -> dict[str, Any]:
        from kiln.tasks.plugin.execute import offered_tiers

        home = os.environ.get("KILN_HOME", os.path.expanduser("~"))
        return {
            "sandbox_tiers": list(offered_tiers().tiers),
            "cpu_count": os.cpu_count() or 1,
            "gpu_count": 0,
            "gpu_names": [],
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "vram_gb": 0,
            "storage_gb": round(shutil.disk_usage(home if os.path.exists(home) else "/").free / 2**30, 1),
        }

    async def _heartbeat_loop(self) -> None:
        offers = self.offers()
        while True:
            self._beat_now.clear()
            try:
                emit_event(
                    HEARTBEAT_EVENT,
                    resource={"prefect.resource.id": f"kiln.worker.{self.name}"},
                    payload={
                        "instance": self.instance,
                        "slots": self.slots,
                        "service_slots": self.service_slots,
                        "offers": offers,
                        # every run this worker holds: taken and being submitted, or running
                        "running": sorted(self._taken | self._running.keys()),
                    },
                )
                await self._check_cancelling()
                if self._cluster is not None:
                    mend_local_cluster(self._cluster, self._dask_workers)
            except Exception as exc:  # noqa: BLE001 - keep beating through API outages
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(self._beat_now.wait(), self._kiln_heartbeat_seconds)
            except asyncio.TimeoutError:
                pass

    async def _watch_events(self) -> None:
        """Wakes the poll the moment a run is scheduled, and stops runs the moment they are cancelled."""
        while self._work_pool is None:
            await asyncio.sleep(0.1)
        event_filter = EventFilter(
            event=EventNameFilter(name=["prefect.flow-run.Scheduled", "prefect.flow-run.Cancelling"]),
            any_resource=EventAnyResourceFilter(id=[f"prefect.work-pool.{self._work_pool.id}"]),
        )
        while True:
            try:
                async with get_events_subscriber(filter=event_filter) as subscriber:
                    self._poll_now.set()
                    async for event in subscriber:
                        if event.event.endswith(".Scheduled"):
                            self._poll_now.set()
                        else:
                            flow_run_id = event.resource.id.removeprefix("prefect.flow-run.")
                            await self._cancel_run(UUID(flow_run_id))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Prefect restarts; polling covers the gap
                log.warning("event subscription lost (%s); resubscribing", exc)
                await asyncio.sleep(1)

    async def _fast_poll_loop(self) -> None:
        while True:
            await self._poll_now.wait()
            self._poll_now.clear()
            try:
                await self.get_and_submit_flow_runs()
            except Exception as exc:  # noqa: BLE001 - the regular poll loop retries
                log.warning("poll failed: %s", exc)

    async def _check_cancelling(self) -> None:
        """Catches cancellations whose event was missed (the websocket was down)."""
        if not self._running:
            return
        runs = await self.client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[UUID(i) for i in self._running]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
            )
        )
        for run in runs:
            await self._cancel_run(run.id)

    # running

    def _release_limit_slot(self, flow_run_id: UUID) -> None:
        super()._release_limit_slot(flow_run_id)
        # the dispatcher releases the next job as this one ends; take it now, not at the next poll
        self._poll_now.set()

    async def _submit_scheduled_flow_runs(self, flow_run_response: list) -> list[FlowRun]:
        """Takes batch runs only into free batch slots, and persistent jobs' runs only into free service slots.

        The dispatcher releases batch jobs ahead of the free slots (KILN_RELEASE_AHEAD); under Prefect's one limit
        they would also fill the service slots, and a persistent job released next would wait behind them. Runs come
        in Prefect's order (band, then scheduled time), so each kind is taken in the order kiln released it.
        """
        async with self._choosing:
            held = set(self.limiter.statistics().borrowers)
            self._persistent_runs = {run: p for run, p in self._persistent_runs.items() if run in held}
            busy_services = sum(self._persistent_runs.values())
            offered = [entry for entry in flow_run_response if entry.flow_run.id not in self._submitting_flow_run_ids]
            kinds = [await self._runs_persistent_job(entry.flow_run) for entry in offered]
            taken = take_within_slots(kinds, free=self.slots - (len(held) - busy_services),
                                      services_free=self.service_slots - busy_services)  # fmt: skip
            for i in taken:
                self._persistent_runs[offered[i].flow_run.id] = kinds[i]
            return await super()._submit_scheduled_flow_runs([offered[i] for i in taken])

    async def _runs_persistent_job(self, flow_run: FlowRun) -> bool:
        """Whether the run is a persistent job's (it takes a service slot, not a batch slot)."""
        try:
            job_type = self._job_type(await self._deployment_spec(flow_run))
        except ObjectNotFound:  # its deployment is gone: Prefect's worker cancels it when it takes it
            return False
        return job_type is not None and job_type.persistent

    async def _submit_run(self, flow_run: FlowRun) -> None:
        # the run is this worker's from before it proposes Pending until run() has it in _running
        run_id = str(flow_run.id)
        self._taken.add(run_id)
        self._beat_now.set()
        try:
            await super()._submit_run(flow_run)
        finally:
            self._taken.discard(run_id)
            self._ended_in_submission.pop(run_id, None)

    async def _propose_submitting_state(self, flow_run: FlowRun) -> None:
        """Submitting, unless the run already ended (kiln cancelled it, or crashed it as an orphan) while this
        worker was taking it: Prefect lets a final state give way to Pending (its manual retries), so the run
        would be reopened and start after all, beside its job's retry."""
        current = await self.client.read_flow_run(flow_run.id)
        if current.state is not None and current.state.is_final():
            self._ended_in_submission[str(flow_run.id)] = current.state
            return
        await super()._propose_submitting_state(flow_run)

    async def _deployment_spec(self, flow_run: FlowRun) -> DeploymentSpec:
        if flow_run.deployment_id not in self._deployments:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            self._deployments[flow_run.deployment_id] = DeploymentSpec(
                name=deployment.name,
                entrypoint=deployment.entrypoint,
                description=deployment.description or "",
                tags=tuple(deployment.tags),
                work_queue_name=deployment.work_queue_name or "",
            )
        return self._deployments[flow_run.deployment_id]

    async def run(
        self,
        flow_run: FlowRun,
        configuration: KilnJobConfiguration,
        task_status: Optional[anyio.abc.TaskStatus[int]] = None,
    ) -> KilnWorkerResult:
        run_id = str(flow_run.id)
        ended = self._ended_in_submission.pop(run_id, None)
        if ended is not None:
            log.warning("flow run %s not started: it ended %s while this worker was taking it (%s)", run_id,
                        ended.type.value, ended.message)  # fmt: skip
            if task_status is not None:
                task_status.started(None)
            return KilnWorkerResult(identifier="", status_code=0)
        spec = await self._deployment_spec(flow_run)
        timeout = configuration.max_timeout_run_ms / 1000 if configuration.max_timeout_run_ms else None
        # a key of its own per submission: a resumed run (a lab booking) is submitted again under the same flow run
        # id, and a Dask key used twice in one client shares the first future's state (done, or cancelled when the
        # first future is released), so the second run would end "cancelled for reason: unknown"
        future = self._dask.submit(
            executor.execute_flow_run, run_id, spec.module, spec.function, timeout, self._fans_out(spec),
            self._report_to(flow_run), key=f"kiln-{run_id}-{uuid4().hex[:8]}", pure=False,
        )
        self._running[run_id] = future
        self._beat_now.set()
        if task_status is not None:
            task_status.started(f"dask:{future.key}")
        status_code = 0
        try:
            outcome = await future
            log.info("flow run %s ended %s", run_id, outcome["state"])
        except Exception as exc:  # noqa: BLE001 - every way a Dask task can fail ends the run with a reason
            status_code = 1
            outcome = {"state": StateType.CRASHED.value, "message": describe_dask_failure(exc)}
            await self._clean_sandbox(run_id)
        finally:
            self._running.pop(run_id, None)
        await self._settle(flow_run.id, outcome)
        # not waited for: the slot frees now, whatever the API's answer takes
        told = asyncio.create_task(self._say_ended(flow_run))
        self._telling.add(told)
        told.add_done_callback(self._telling.discard)
        return KilnWorkerResult(identifier=f"dask:{future.key}", status_code=status_code)

    async def _say_ended(self, flow_run: FlowRun) -> None:
        """Tells the kiln API the run ended (POST /api/v1/jobs/{id}/ended, kiln's own path): the job ends, and the
        next one takes its slot, without waiting for Prefect's event of the end, which lags under load. The event
        still comes; a word that does not reach the API changes nothing but when the job is seen to end."""
        target = self._report_to(flow_run)
        if target is None:
            return
        from kiln.run_reports import RUN_TOKEN_HEADER, read_run_token

        api_url, token = target
        job_id, _ = read_run_token(self._run_key, token)
        try:
            response = await self._kiln_api.post(f"{api_url}/api/v1/jobs/{job_id}/ended",
                                                 headers={RUN_TOKEN_HEADER: token})  # fmt: skip
            if response.status_code != 200:
                log.warning("the kiln API did not take the end of flow run %s (%s): %s", flow_run.id,
                            response.status_code, response.text[:300])  # fmt: skip
        except httpx.HTTPError as exc:
            log.warning("could not tell the kiln API that flow run %s ended (%s); its Prefect event will",
                        flow_run.id, type(exc).__name__)  # fmt: skip

    def _report_to(self, flow_run: FlowRun) -> tuple[str, str] | None:
        """Where the run sends its progress on kiln's own path: the kiln API and the run's token (kiln.run_reports);
        None for a run of no kiln job."""
        from kiln.run_reports import run_token
        from kiln.settings import get_settings

        job_id = next((tag[4:] for tag in flow_run.tags or () if tag.startswith("job:")), None)
        if job_id is None or self._run_key is None:
            return None
        return get_settings().callback_base_url, run_token(self._run_key, job_id, str(flow_run.id))

    def _fans_out(self, spec: DeploymentSpec) -> bool:
        """Whether the deployment's flow is that of a job type whose flow runs tasks of its own on the cluster."""
        job_type = self._job_type(spec)
        return job_type is not None and job_type.fans_out

    @staticmethod
    def _job_type(spec: DeploymentSpec):
        """The job type whose flow the deployment runs; None for an operator's own deployment (prefect.yaml)."""
        # every registered type, not only the available ones: that check looks for each type's libraries on disk,
        # 7 % of the worker's CPU when it ran for every run offered (bench/batch_submit.py, py-spy)
        from kiln.registry import job_types

        return next((jt for jt in job_types().values()
                     if jt.module == spec.module and jt.flow.fn.__name__ == spec.function), None)  # fmt: skip

    async def _clean_sandbox(self, run_id: str) -> None:
        """A plugin the run had started outlives a Dask process that dies (a container is its own process tree)."""
        from kiln.tasks.plugin.sandbox import clean_leftovers

        if self._sandbox_dir is not None:
            cleaned = await clean_leftovers(self._sandbox_dir, run_id)
            if cleaned:
                log.warning("flow run %s: removed its plugin run(s) %s", run_id, ", ".join(cleaned))

    async def _settle(self, flow_run_id: UUID, outcome: dict) -> None:
        """Makes sure the run ends in Prefect with the right final state, retrying through API outages."""
        reason = self._cancel_reasons.pop(str(flow_run_id), None)
        if reason is None and outcome.get("state") in (StateType.COMPLETED.value, StateType.FAILED.value):
            return  # the engine set this final state itself, or found it set
        for attempt in range(60):
            try:
                current = await self.client.read_flow_run(flow_run_id)
                if reason is not None:
                    if current.state is None or current.state.type is not StateType.CANCELLED:
                        await force_state(self.client, flow_run_id, Cancelled(message=reason))
                    await self._cancel_subflows(flow_run_id, reason)
                elif outcome.get("state") == StateType.PAUSED.value and current.state is not None:
                    # suspended (a lab booking waiting for the lab): it waits in Prefect holding no worker, and a
                    # resume schedules it again (Scheduled, then Running on whichever worker takes it); not a crash
                    pass
                elif current.state is None or not current.state.is_final():
                    message = outcome.get("message") or "the job's process ended without reporting a final state"
                    await force_state(self.client, flow_run_id, Crashed(message=message))
                return
            except Exception as exc:  # noqa: BLE001 - the Prefect API may be restarting
                log.warning("could not settle flow run %s (attempt %d): %s", flow_run_id, attempt + 1, exc)
                await asyncio.sleep(min(5, 0.5 * (attempt + 1)))

    async def _cancel_subflows(self, flow_run_id: UUID, reason: str) -> None:
        """Subflows stopped with their parent crash on the way down; they were cancelled, and say so."""
        parents = [flow_run_id]
        while parents:
            children = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=parents))
            )
            for child in children:
                if child.state is None or child.state.type not in (StateType.CANCELLED, StateType.COMPLETED):
                    await force_state(self.client, child.id, Cancelled(message=f"its parent job was {reason}"))
            parents = [child.id for child in children]

    async def _cancel_run(self, flow_run_id: UUID) -> None:
        run_id = str(flow_run_id)
        if run_id not in self._running:
            await super()._cancel_run(flow_run_id)
            return
        if run_id in self._cancel_reasons:
            return
        flow_run = await self.client.read_flow_run(flow_run_id)
        self._cancel_reasons[run_id] = (flow_run.state.message if flow_run.state else None) or "cancelled"
        await self._dask.run(executor.cancel_flow_run, run_id)

    async def kill_infrastructure(self, infrastructure_pid: str, configuration, grace_seconds: int = 30) -> None:
        for run_id, future in list(self._running.items()):
            if f"dask:{future.key}" == infrastructure_pid:
                self._cancel_reasons.setdefault(run_id, "cancelled")
                await self._dask.run(executor.cancel_flow_run, run_id)
