"""The `kiln` command: the embedded stack, its parts, API keys, and jobs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from kiln.settings import KilnSettings, get_settings

app = typer.Typer(help="kiln: a unified compute-job platform for materials science, on Prefect 3.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys: each belongs to one project.", no_args_is_help=True)
worker_app = typer.Typer(help="The kiln worker: runs jobs on a Dask cluster.", no_args_is_help=True)
clusters_app = typer.Typer(help="HPC clusters (Prefect blocks) jobs can name as compute_target.", no_args_is_help=True)
projects_app = typer.Typer(help="Projects: their core-hour budgets.", no_args_is_help=True)
batch_app = typer.Typer(help="Batches of up to 1000 jobs.", no_args_is_help=True)
files_app = typer.Typer(help="Files: uploads a job's input names, and the files jobs produced.", no_args_is_help=True)
llm_app = typer.Typer(help="LLM calls through kiln: providers, their keys and models.", no_args_is_help=True)
providers_app = typer.Typer(help="LLM providers (Prefect blocks; keys in Prefect Secret blocks).", no_args_is_help=True)
llm_app.add_typer(providers_app, name="providers")
app.add_typer(llm_app, name="llm")
app.add_typer(batch_app, name="batch")
app.add_typer(files_app, name="files")
mcp_app = typer.Typer(help="MCP deployments: servers kiln keeps serving at one URL each (mcp_host jobs).",
                      no_args_is_help=True)  # fmt: skip
app.add_typer(mcp_app, name="mcp")
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")
app.add_typer(worker_app, name="worker")
app.add_typer(clusters_app, name="clusters")
plugins_app = typer.Typer(help="Plugins (Prefect blocks): containerized programs kiln runs in a sandbox.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(plugins_app, name="plugins")
labs_app = typer.Typer(help="Labs: robot labs and instruments lab_booking jobs book time on.", no_args_is_help=True)
app.add_typer(labs_app, name="labs")


def _prefect_ready(settings: KilnSettings) -> None:
    # Prefect reads its settings once, at import: point it at kiln's server first
    from kiln.prefect_env import configure_prefect

    if "prefect" not in sys.modules:
        configure_prefect(settings)


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


# the stack and its parts


@app.command()
def up(
    demo: bool = typer.Option(True, help="Submit one `sleep` job once the stack is up and show its result."),
) -> None:
    """Starts the embedded stack (Prefect server, kiln API, kiln worker) on loopback; Ctrl-C stops it."""
    from kiln.launcher import Stack, default_key_file

    settings = get_settings()
    key_file = default_key_file(settings)
    if not key_file.exists():
        key = asyncio.run(_create_key(settings, "default"))
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    stack = Stack(settings, log=typer.echo)
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            typer.echo("stopping kiln …")
            stack.stop()
            raise typer.Exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    stack.start()
    typer.echo(f"API key of project 'default': {key_file}")
    typer.echo(f"state under {settings.home_dir}; logs in {stack.logs_dir}")
    if demo:
        _demo(settings, key_file.read_text().strip())
    typer.echo("kiln is up; Ctrl-C stops it.")
    code = stack.supervise(lambda: stopping)
    stack.stop()
    raise typer.Exit(code)


def _demo(settings: KilnSettings, key: str) -> None:
    from kiln.sdk import Client

    with Client(settings.api_url, key) as client:
        job = client.jobs.create(type="sleep", input={"seconds": 1}, refresh=True)  # a run, not a cache hit
        typer.echo(f"submitted sleep job {job.id}; watching it …")
        job.wait(timeout=120)
        typer.echo(f"job {job.id} {job.status.value}: {json.dumps(job.output)}  ({job.flow_run_url})")
    typer.echo(
        f"try it yourself:\n  curl -s -X POST {settings.api_url}/api/v1/jobs -H \"Authorization: Bearer $(cat "
        f"{settings.home_dir / 'api-key'})\" -H 'Content-Type: application/json' "
        "-d '{\"type\": \"sleep\", \"input\": {\"seconds\": 2}}'"
    )


@app.command()
def api() -> None:
    """Runs the kiln API with its dispatcher and event relay (part of `kiln up`)."""
    settings = get_settings()
    _prefect_ready(settings)
    import uvicorn

    from kiln.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


@app.command()
def deploy(
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", exists=True, dir_okay=False, help="A project file like prefect.yaml; default kiln's own."
    ),
) -> None:
    """Applies prefect.yaml: the work pool, its priority-band queues, one deployment per job type and the
    scheduled batch runs (deployments of another name, with their schedules)."""
    _prefect_ready(get_settings())
    from prefect.client.orchestration import get_client

    from kiln.deployments.project import load_project
    from kiln.dispatch.runs import apply_project

    async def main():
        async with get_client() as client:
            return await apply_project(client, file)

    for job_type, deployment_id in asyncio.run(main()).items():
        typer.echo(f"{job_type}: deployment {deployment_id}")
    for spec in load_project(file).deployments:
        if not spec.serves_jobs:
            when = ", ".join(str(s.get("cron") or s.get("interval") or s.get("rrule")) +
                             ("" if s.get("active", True) else " (inactive)") for s in spec.schedules)  # fmt: skip
            typer.echo(f"{spec.entrypoint.split(':')[1]}/{spec.name}: {when or 'no schedule'}")


@worker_app.command("start")
def worker_start(
    scheduler_address: Optional[str] = typer.Option(
        None, "--scheduler-address", help="tcp:// address of an existing Dask scheduler (default: a LocalCluster)."
    ),
    slots: Optional[int] = typer.Option(None, help="Jobs run at the same time (default KILN_WORKER_SLOTS)."),
    name: Optional[str] = typer.Option(None, help="The worker's name in Prefect (default kiln-HOST-PID)."),
) -> None:
    """Starts a kiln worker: polls the kiln work pool and runs its flow runs on Dask, in warm processes."""
    import os

    settings = get_settings()
    _prefect_ready(settings)
    from kiln.deployments.project import load_project
    from kiln.worker.worker import KilnWorker

    async def main():
        worker = KilnWorker(
            load_project().work_pool,
            slots=slots or settings.worker_slots,
            service_slots=settings.worker_service_slots,
            scheduler_address=scheduler_address or settings.dask_scheduler_address,
            dask_workers=settings.dask_workers,
            heartbeat_seconds=settings.worker_heartbeat_seconds,
            name=name or f"kiln-{socket.gethostname()}-{os.getpid()}",
        )
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await worker.start()
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


# API keys


async def _create_key(settings: KilnSettings, project: str) -> str:
    from kiln.store.store import Store

    store = Store(settings.job_index_url)
    try:
        await store.migrate()
        return await store.create_key(project)
    finally:
        await store.close()


@keys_app.command("create")
def keys_create(
    project: str = typer.Option(..., "--project", help="The project the key belongs to."),
    llm_calls_per_minute: int = typer.Option(None, min=1, help="At most this many LLM calls a minute with the key."),
    llm_tokens_per_minute: int = typer.Option(None, min=1, help="At most this many LLM tokens a minute with the key."),
) -> None:
    """Creates an API key for the project (and the project, if new); the key is the last line printed."""
    key = asyncio.run(_create_key(get_settings(), project))
    if llm_calls_per_minute is not None or llm_tokens_per_minute is not None:
        _set_limits(key, llm_calls_per_minute, llm_tokens_per_minute)
    typer.echo(f"new API key for project {project!r}; it is shown only now:")
    typer.echo(key)


@keys_app.command("limits")
def keys_limits(
    key: str = typer.Argument(..., help="The key, or the first 12 characters of it."),
    llm_calls_per_minute: int = typer.Option(None, min=1, help="At most this many LLM calls a minute; none if left out."),
    llm_tokens_per_minute: int = typer.Option(None, min=1, help="At most this many LLM tokens a minute; none if left out."),
) -> None:
    """Sets a key's LLM rate limits (the drop-in endpoints answer 429 with Retry-After past them)."""
    count = _set_limits(key, llm_calls_per_minute, llm_tokens_per_minute)
    if count == 0:
        _fail(f"no active key matches {key[:12]}…")
    calls = f"{llm_calls_per_minute} calls" if llm_calls_per_minute else "no limit on calls"
    tokens = f"{llm_tokens_per_minute} tokens" if llm_tokens_per_minute else "no limit on tokens"
    typer.echo(f"{count} key(s): {calls}, {tokens} per minute")


def _set_limits(key: str, calls: int | None, tokens: int | None) -> int:
    from kiln.store import llm
    from kiln.store.store import Store

    async def main() -> int:
        store = Store(get_settings().job_index_url)
        try:
            await store.migrate()
            return await llm.set_key_limits(store, key, calls, tokens)
        finally:
            await store.close()

    return asyncio.run(main())


def _on_project(change, project: str, value) -> None:
    """Runs `change(store, project, value)` on the job index; a KilnError (no such project) ends the command."""
    from kiln.errors import KilnError
    from kiln.store.store import Store

    async def main() -> None:
        store = Store(get_settings().job_index_url)
        try:
            await store.migrate()
            await change(store, project, value)
        finally:
            await store.close()

    try:
        asyncio.run(main())
    except KilnError as exc:
        _fail(exc.message)
        raise typer.Exit(1) from None


@projects_app.command("budget")
def projects_budget(
    project: str = typer.Argument(..., help="The project's name."),
    core_hours: str = typer.Option(None, "--core-hours", help="The budget in core-hours, or 'none' for no limit."),
    usd: str = typer.Option(None, "--usd", help="The LLM budget in US dollars, or 'none' for no limit."),
) -> None:
    """Sets a project's budgets: core-hours (a batch that would exceed it is refused, 402, nothing submitted) and
    USD for LLM calls (each call holds max_tokens × price until it ends; one that cannot is refused, 402)."""
    from kiln.store import llm
    from kiln.store.batches import set_budget

    if core_hours is None and usd is None:
        _fail("give --core-hours and/or --usd: a number, or 'none' to remove the limit")
    for value, change, unit in ((core_hours, set_budget, "core-hours"), (usd, llm.set_budget, "USD for LLM calls")):
        if value is None:
            continue
        limit = _limit(value, "--core-hours" if change is set_budget else "--usd")
        _on_project(change, project, limit)
        typer.echo(f"project {project!r}: " + (f"budget {limit:g} {unit}" if limit is not None else f"no limit on {unit}"))


def _limit(value: str, option: str) -> float | None:
    """A limit as the CLI takes it: a number ≥ 0, or 'none'."""
    if value.strip().lower() == "none":
        return None
    try:
        limit = float(value)
    except ValueError:
        limit = -1.0
    if not limit >= 0:
        _fail(f"{option}: {value!r} is neither a number ≥ 0 nor 'none'")
    return limit


@projects_app.command("cache")
def projects_cache(
    project: str = typer.Argument(..., help="The project's name."),
    reuse: bool = typer.Option(True, "--on/--off", help="Answer a repeated finished job from its result."),
) -> None:
    """Turns cache hits on (the default) or off for a project; `refresh` still forces a run per job."""
    from kiln.store.batches import set_reuse_results

    _on_project(set_reuse_results, project, reuse)
    typer.echo(f"project {project!r}: cache hits {'on' if reuse else 'off'}")


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="The key, or the first 12 characters of it.")) -> None:
    """Revokes an API key; requests with it are refused from now on."""
    from kiln.store.store import Store

    async def main() -> int:
        store = Store(get_settings().job_index_url)
        try:
            await store.migrate()
            return await store.revoke_key(key)
        finally:
            await store.close()

    count = asyncio.run(main())
    if count == 0:
        _fail(f"no active key matches {key[:12]}…")
    typer.echo(f"revoked {count} key(s)")


# HPC clusters


@clusters_app.command("add")
def clusters_add(
    name: str = typer.Argument(..., help="The name jobs use as their compute_target."),
    scheduler: str = typer.Option(..., help="slurm or pbs."),
    queue: Optional[str] = typer.Option(None, help="Partition (SLURM) or queue (PBS)."),
    account: Optional[str] = typer.Option(None, help="Account (SLURM) or project (PBS) to charge."),
    cores: int = typer.Option(1, help="Cores of one batch job (the most cpu_count a job may ask)."),
    memory: str = typer.Option("2GB", help="Memory of one batch job, e.g. 4GB."),
    walltime: str = typer.Option("01:00:00", help="Walltime of one batch job, HH:MM:SS."),
    processes: int = typer.Option(1, help="Dask worker processes per batch job."),
    max_jobs: int = typer.Option(4, help="Most batch jobs one kiln job holds at once."),
    slots: Optional[int] = typer.Option(None, help="Most unfinished kiln jobs the cluster takes (no limit unset)."),
    directive: list[str] = typer.Option([], help="An extra scheduler directive (repeatable), e.g. --qos=long."),
    prologue: list[str] = typer.Option([], help="A shell line run before the worker starts (repeatable)."),
    python: Optional[str] = typer.Option(None, help="The Python on the nodes; this one by default."),
    scheduler_host: str = typer.Option("127.0.0.1", help="This machine's address as the nodes reach it."),
    log_directory: Optional[str] = typer.Option(None, help="Where batch jobs write their output."),
    overwrite: bool = typer.Option(False, help="Replace a cluster already registered under this name."),
) -> None:
    """Registers an HPC cluster as a Prefect block."""
    _prefect_ready(get_settings())
    from pydantic import ValidationError

    from kiln.blocks.cluster import HpcCluster

    try:
        cluster = HpcCluster(
            scheduler=scheduler, queue=queue, account=account, cores=cores, memory=memory, walltime=walltime,
            processes=processes, max_jobs=max_jobs, slots=slots, job_extra_directives=directive, job_script_prologue=prologue,
            python=python, scheduler_host=scheduler_host, log_directory=log_directory,
        )
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    try:
        cluster.save(name, overwrite=overwrite)
    except ValueError as exc:
        _fail(f"{name}: {exc}; pass --overwrite to replace it")
    typer.echo(f"cluster {name!r} registered ({scheduler}, queue {queue or 'default'})")


@clusters_app.command("list")
def clusters_list() -> None:
    """Lists the registered HPC clusters."""
    _prefect_ready(get_settings())
    from kiln.blocks.cluster import registered_clusters

    for name, cluster in sorted(asyncio.run(registered_clusters()).items()):
        typer.echo(f"{name}\t{cluster.scheduler}\tqueue={cluster.queue or '-'}\tcores={cluster.cores}"
                   f"\tmemory={cluster.memory}\twalltime={cluster.walltime}\tmax_jobs={cluster.max_jobs}")


@clusters_app.command("remove")
def clusters_remove(name: str) -> None:
    """Removes a registered HPC cluster."""
    _prefect_ready(get_settings())
    from kiln.blocks.cluster import HpcCluster

    try:
        HpcCluster.delete(name)
    except Exception as exc:  # noqa: BLE001 - Prefect says not found in several ways
        _fail(f"{name}: no such cluster ({exc})")
    typer.echo(f"cluster {name!r} removed")


# plugins


@plugins_app.command("add")
def plugins_add(
    name: str = typer.Argument(..., help="The plugin's name: lowercase letters, digits and dashes."),
    image: Path = typer.Option(..., exists=True, help="A docker save archive, an OCI layout folder or its tarball."),
    entrypoint: list[str] = typer.Option([], help="The program, then its first arguments (repeatable); the "
                                         "image's Entrypoint (then Cmd) when not given."),  # fmt: skip
    arg: list[str] = typer.Option([], help="An argument after the entrypoint (repeatable); the image's Cmd unset."),
    env: list[str] = typer.Option([], help="K=V, an environment variable of every run (repeatable)."),
    cpus: Optional[float] = typer.Option(None, help="Default CPU cores of a run."),
    memory_mb: Optional[int] = typer.Option(None, help="Default memory of a run, MB."),
    pids: Optional[int] = typer.Option(None, help="Default most processes and threads of a run."),
    wall_seconds: Optional[float] = typer.Option(None, help="Default wall time of a run, seconds."),
    output_mb: Optional[int] = typer.Option(None, help="Default size of a run's /out, MB."),
    tmp_mb: Optional[int] = typer.Option(None, help="Default size of a run's /tmp, MB."),
    input_schema: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                                help="A JSON Schema file the input of every run must match."),
    tier: Optional[str] = typer.Option(None, help="The sandbox tier every run needs: A (runc, cgroups) or B "
                                       "(bubblewrap); any when not given."),  # fmt: skip
    description: str = typer.Option("", help="What the plugin does."),
    overwrite: bool = typer.Option(False, help="Replace a plugin already registered under this name."),
) -> None:
    """Registers a plugin as a Prefect block, importing its image into KILN_HOME first."""
    settings = get_settings()
    _prefect_ready(settings)
    from pydantic import ValidationError

    from kiln.blocks.plugin import load_plugin
    from kiln.errors import KilnError
    from kiln.schemas.plugins import PluginSpec
    from kiln.tasks.plugin.register import plugin_from_image

    for item in env:
        if "=" not in item:
            _fail(f"--env: give K=V, not {item!r}")
    variables = dict(item.partition("=")[::2] for item in env)
    limits = {key: value for key, value in (("cpus", cpus), ("memory_mb", memory_mb), ("pids", pids),
              ("wall_seconds", wall_seconds), ("output_mb", output_mb), ("tmp_mb", tmp_mb)) if value is not None}
    schema = None
    if input_schema is not None:
        try:
            schema = json.loads(input_schema.read_text())
        except json.JSONDecodeError as exc:
            _fail(f"--input-schema: {input_schema} is not JSON ({exc})")
    try:
        spec = PluginSpec.model_validate({
            "name": name, "entrypoint": entrypoint or None, "args": arg or None, "env": variables,
            "limits": limits, "input_schema": schema, "tier": tier, "description": description,
            "overwrite": overwrite,
        }, strict=False)  # fmt: skip
    except ValidationError as exc:
        # a limit's option is named after the limit (--memory-mb), any other after its field
        options = [str(e["loc"][-1] if e["loc"][0] == "limits" else e["loc"][0]) for e in exc.errors()]
        _fail("; ".join(f"--{option.replace('_', '-')}: {e['msg']}" for option, e in zip(options, exc.errors())))
    if not overwrite and asyncio.run(load_plugin(name)) is not None:
        _fail(f"{name}: a plugin of this name is registered; pass --overwrite to replace it")
    try:
        plugin = plugin_from_image(image, spec, settings.plugin_images_dir)
    except KilnError as exc:
        _fail(exc.message)
    try:
        plugin.save(name, overwrite=overwrite)
    except ValueError as exc:
        _fail(f"{name}: {exc}; pass --overwrite to replace it")
    typer.echo(f"plugin {name!r} registered (image {plugin.image_digest[:19]}, runs {' '.join(plugin.argv)})")


@plugins_app.command("list")
def plugins_list() -> None:
    """Lists the registered plugins (the names of their environment variables, not the values)."""
    _prefect_ready(get_settings())
    from kiln.blocks.plugin import registered_plugins

    for name, p in sorted(asyncio.run(registered_plugins()).items()):
        typer.echo(f"{name}\t{p.image_digest[:19]}\t{' '.join(p.argv)}\tmemory_mb={p.limits.memory_mb}"
                   f"\tcpus={p.limits.cpus:g}\twall_seconds={p.limits.wall_seconds:g}\t{p.description}")


@plugins_app.command("remove")
def plugins_remove(name: str) -> None:
    """Removes a registered plugin (its image stays in the store: another plugin may run it)."""
    _prefect_ready(get_settings())
    from kiln.blocks.plugin import Plugin

    try:
        Plugin.delete(name)
    except Exception as exc:  # noqa: BLE001 - Prefect says not found in several ways
        _fail(f"{name}: no such plugin ({exc})")
    typer.echo(f"plugin {name!r} removed")


# labs


@labs_app.command("simulate")
def labs_simulate(
    port: int = typer.Option(8700, help="The port to serve on."),
    host: str = typer.Option("127.0.0.1", help="The address to serve on."),
    api_key: Optional[str] = typer.Option(
        None, envvar="KILN_LAB_SIM_API_KEY", show_default=False,
        help="The API key callers must send as 'Authorization: Bearer …' [default: the README's test key].",
    ),
    secret: Optional[str] = typer.Option(
        None, envvar="KILN_LAB_SIM_SECRET", show_default=False,
        help="The whsec_… secret callbacks are signed with [default: the README's test secret].",
    ),
    resources: str = typer.Option("xrd-1,furnace-1,synth-1", help="The lab's resources, comma-separated."),
    time_scale: float = typer.Option(3600.0, help="Lab seconds per wall second: at 3600 an hour's booking takes 1 s."),
    progress_steps: int = typer.Option(2, help="progress callbacks between started and the outcome."),
    duplicate_rate: float = typer.Option(0.0, help="Share of callbacks delivered twice (same webhook-id)."),
    reorder_rate: float = typer.Option(0.0, help="Share of bookings whose callbacks arrive last first."),
    callback_delay: float = typer.Option(0.0, help="Wall seconds each callback waits before it is sent."),
    callback_jitter: float = typer.Option(0.0, help="Up to this many wall seconds more, drawn per callback."),
    lost_rate: float = typer.Option(0.0, help="Share of callbacks never sent (polling finds the result)."),
    booking_failures: int = typer.Option(0, help="POST /bookings answers 5xx to the first N attempts of each key."),
    booking_failure_mode: str = typer.Option(
        "before_booking", help="before_booking (503, nothing booked) or after_booking (booked, answer lost: 500).",
    ),
    forged_rate: float = typer.Option(0.0, help="Share of callbacks preceded by a copy signed with a wrong key."),
    stale_rate: float = typer.Option(0.0, help="Share of callbacks preceded by a copy with an old timestamp."),
    stale_by: float = typer.Option(600.0, help="How many seconds old a stale copy's timestamp is."),
    mutated_rate: float = typer.Option(0.0, help="Share of callbacks preceded by a copy altered after signing."),
    rotation_secret: Optional[str] = typer.Option(
        None, envvar="KILN_LAB_SIM_ROTATION_SECRET", show_default=False,
        help="A new whsec_… secret to sign with as well: two signatures per header (key rotation).",
    ),
    fail_rate: float = typer.Option(0.0, help="Share of bookings whose run ends failed."),
    race_rate: float = typer.Option(0.0, help="Share of POST /bookings that lose their window to another client."),
    blocked: list[str] = typer.Option(
        [], help="A window already booked by others, RESOURCE,START,END in ISO 8601 (repeat the option)."
    ),
    retry_base: float = typer.Option(0.2, help="Wall seconds before a callback without a 2xx is retried, doubling."),
    retry_attempts: int = typer.Option(6, help="Attempts of one callback before the lab gives up."),
    seed: Optional[int] = typer.Option(None, help="Seeds the rates' draws, for a repeatable run."),
) -> None:
    """Serves a simulated lab that speaks kiln's lab protocol, with switches for faults (README, "The lab protocol").

    The switches can be changed on the running simulator with POST /_sim/config.
    """
    import uvicorn
    from pydantic import ValidationError

    from kiln.lab_simulator import DEFAULT_API_KEY, DEFAULT_SECRET, LabSimulator, SimConfig, create_app

    windows = []
    for value in blocked:
        parts = value.split(",")
        if len(parts) != 3:
            _fail(f"--blocked: {value!r} is not RESOURCE,START,END")
        windows.append(dict(zip(("resource", "start", "end"), parts)))
    switches = dict(
        time_scale=time_scale, progress_steps=progress_steps, duplicate_rate=duplicate_rate,
        reorder_rate=reorder_rate, callback_delay_s=callback_delay, callback_jitter_s=callback_jitter,
        lost_rate=lost_rate, booking_failures=booking_failures, booking_failure_mode=booking_failure_mode,
        forged_rate=forged_rate, stale_rate=stale_rate, stale_by_s=stale_by, mutated_rate=mutated_rate,
        rotation_secret=rotation_secret, fail_rate=fail_rate, race_rate=race_rate, blocked=windows,
        retry_base_s=retry_base, retry_attempts=retry_attempts, seed=seed,
    )  # fmt: skip
    # the options' names, for the messages: --callback-delay for callback_delay_s
    options = {"callback_delay_s": "callback-delay", "callback_jitter_s": "callback-jitter", "stale_by_s": "stale-by",
               "retry_base_s": "retry-base"}  # fmt: skip
    try:
        config = SimConfig.model_validate(switches)
        lab = LabSimulator(api_key=api_key or DEFAULT_API_KEY, secret=secret or DEFAULT_SECRET,
                           resources=[name.strip() for name in resources.split(",") if name.strip()], config=config)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "blocked"
        _fail(f"--{options.get(name, name.replace('_', '-'))}: {first['msg'].removeprefix('Value error, ')}")
    except ValueError as exc:
        _fail(f"--secret: {exc}")
    if not lab.resources:
        _fail("--resources: name at least one resource")
    typer.echo(f"lab simulator on http://{host}:{port} (resources {', '.join(lab.resources)}; "
               f"{config.time_scale:g} lab seconds per second); Ctrl-C stops it")  # fmt: skip
    uvicorn.run(create_app(lab), host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)


@labs_app.command("add")
def labs_add(
    name: str = typer.Argument(..., help="The lab's name in kiln: lowercase letters, digits and dashes."),
    base_url: str = typer.Option(..., help="The lab's API, e.g. https://lab.example.org/api (kiln calls /slots, …)."),
    resource: list[str] = typer.Option(..., help="A resource of the lab a booking may name (repeatable)."),
    key_env: str = typer.Option(..., help="The environment variable holding the lab's API key (never the command "
                                "line)."),  # fmt: skip
    secret_env: str = typer.Option(..., help="The environment variable holding the whsec_… secret the lab signs "
                                   "its callbacks with."),  # fmt: skip
    rotate_secret: bool = typer.Option(False, help="A rotation: the lab's current secret stays accepted as the "
                                       "previous one beside the new one (--overwrite implied)."),  # fmt: skip
    description: str = typer.Option("", help="What the lab is."),
    overwrite: bool = typer.Option(False, help="Replace a lab already registered under this name."),
) -> None:
    """Registers a lab as a Prefect block; its key and signing secret are kept as secrets."""
    _prefect_ready(get_settings())
    from pydantic import ValidationError

    from kiln.blocks.lab import Lab, load_lab

    key, secret = os.environ.get(key_env), os.environ.get(secret_env)
    if not key:
        _fail(f"--key-env: the variable {key_env} is unset or empty")
    if not secret:
        _fail(f"--secret-env: the variable {secret_env} is unset or empty")
    existing = asyncio.run(load_lab(name))
    if existing is not None and not (overwrite or rotate_secret):
        _fail(f"{name}: a lab of this name is registered; pass --overwrite to replace it")
    if rotate_secret and existing is None:
        _fail(f"--rotate-secret: no lab {name!r} is registered to rotate")
    previous = existing.signing_secret if rotate_secret else None
    from kiln.webhooks import secret_key

    try:
        secret_key(secret)
    except ValueError as exc:
        _fail(f"--secret-env: {exc}")
    try:
        lab = Lab(base_url=base_url, api_key=key, signing_secret=secret, previous_signing_secret=previous,
                  resources=resource, description=description)  # fmt: skip
    except ValidationError as exc:
        _fail("; ".join(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg'].removeprefix('Value error, ')}"
                        for e in exc.errors()))  # fmt: skip
    lab.save(name, overwrite=True)
    typer.echo(f"lab {name!r} registered ({base_url}; resources {', '.join(resource)}"
               f"{'; the previous signing secret stays accepted' if previous else ''})")  # fmt: skip


@labs_app.command("list")
def labs_list() -> None:
    """Lists the registered labs (never their key or secrets)."""
    _prefect_ready(get_settings())
    from kiln.blocks.lab import registered_labs

    for name, lab in sorted(asyncio.run(registered_labs()).items()):
        typer.echo(f"{name}\t{lab.base_url}\t{','.join(lab.resources)}"
                   f"{chr(9) + 'rotating secret' if lab.previous_signing_secret else ''}\t{lab.description}")


@labs_app.command("remove")
def labs_remove(name: str) -> None:
    """Removes a registered lab."""
    _prefect_ready(get_settings())
    from kiln.blocks.lab import Lab

    try:
        Lab.delete(name)
    except Exception as exc:  # noqa: BLE001 - Prefect says not found in several ways
        _fail(f"{name}: no such lab ({exc})")
    typer.echo(f"lab {name!r} removed")


@labs_app.command("callbacks")
def labs_callbacks(name: str, refused: bool = typer.Option(False, help="Only the refused ones (401, the audit).")):
    """A lab's callbacks: those taken, with what each did, and those refused with 401."""
    with _client() as client:
        answer = _run(lambda: client.labs.callbacks(name))
    if not refused:
        for c in answer["taken"]:
            typer.echo(f"{c['received_at']}\ttaken\t{c['webhook_id']}\t{c['booking']}#{c['sequence']}\t{c['status']}"
                       f"\t{c['effect']}")  # fmt: skip
    for c in answer["refused"]:
        typer.echo(f"{c['received_at']}\trefused\t{c['webhook_id']}\t{c['reason']}\t{c['client']}\t{c['message']}")


@app.command("approve")
def approve(job_id: str, reason: Optional[str] = typer.Option(None, help="Why (kept with the job).")) -> None:
    """Approves a lab_booking job that waits for approval: it books its slot now."""
    with _client() as client:
        job = _run(lambda: client.jobs.approve(job_id, reason=reason))
    typer.echo(f"{job.id}: {job.status.value}: {job.status_reason}")


@app.command("reject")
def reject(job_id: str, reason: str = typer.Option(..., help="Why the booking must not go to the lab.")) -> None:
    """Rejects a lab_booking job that waits for approval: it ends cancelled, nothing sent to the lab."""
    with _client() as client:
        job = _run(lambda: client.jobs.reject(job_id, reason=reason))
    typer.echo(f"{job.id}: {job.status.value}: {job.status_reason}")


# LLM providers


@providers_app.command("add")
def providers_add(
    name: str = typer.Argument(..., help="The provider's name, shown in job outputs and GET /api/v1/llm/providers."),
    kind: str = typer.Option(..., help="openai (also any OpenAI-compatible server) or anthropic."),
    base_url: str = typer.Option(..., help="e.g. https://api.openai.com/v1 or https://api.anthropic.com."),
    model: list[str] = typer.Option(..., help="A model the provider serves (repeatable)."),
    key_env: Optional[str] = typer.Option(
        None, help="Read the API key from this environment variable (keys never go on the command line)."
    ),
    key_stdin: bool = typer.Option(False, help="Read the API key from standard input."),
    priority: int = typer.Option(0, help="Failover order among providers of one model: lower is tried first."),
    input_price: float = typer.Option(0.0, help="USD per million input tokens."),
    output_price: float = typer.Option(0.0, help="USD per million output tokens."),
    cache_read_price: Optional[float] = typer.Option(None, help="USD per million cache-read tokens (input price unset)."),
    cache_write_price: Optional[float] = typer.Option(None, help="USD per million cache-write tokens (input price unset)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the provider to answer or send its next chunk."),
    overwrite: bool = typer.Option(False, help="Replace a provider already registered under this name."),
) -> None:
    """Registers an LLM provider as a Prefect block, its key in a Prefect Secret block."""
    import os

    _prefect_ready(get_settings())
    from prefect.blocks.system import Secret
    from pydantic import ValidationError

    from kiln.blocks.llm import LlmProvider, key_block_name

    key = None
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            _fail(f"--key-env: the environment variable {key_env} is not set or empty")
    elif key_stdin:
        key = sys.stdin.readline().strip()
        if not key:
            _fail("--key-stdin: no key on standard input")
    try:
        provider = LlmProvider(
            kind=kind, base_url=base_url, models=model, priority=priority, input_price=input_price,
            output_price=output_price, cache_read_price=cache_read_price, cache_write_price=cache_write_price,
            timeout_seconds=timeout, key_secret=key_block_name(name) if key else None,
        )  # fmt: skip
    except ValidationError as exc:
        _fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    if key:
        Secret(value=key).save(key_block_name(name), overwrite=True)
    try:
        provider.save(name, overwrite=overwrite)
    except ValueError as exc:
        _fail(f"{name}: {exc}; pass --overwrite to replace it")
    typer.echo(f"LLM provider {name!r} registered ({kind}, {base_url}, models {', '.join(model)}"
               f"{', key in Secret block ' + repr(key_block_name(name)) if key else ', no key'})")  # fmt: skip


@providers_app.command("list")
def providers_list() -> None:
    """Lists the registered LLM providers (never their keys)."""
    _prefect_ready(get_settings())
    from kiln.blocks.llm import registered_providers

    for name, p in sorted(asyncio.run(registered_providers()).items()):
        typer.echo(f"{name}\t{p.kind}\t{p.base_url}\tmodels={','.join(p.models)}\tpriority={p.priority}"
                   f"\tprice(in/out)={p.input_price:g}/{p.output_price:g}\tkey={'yes' if p.key_secret else 'no'}")


@providers_app.command("remove")
def providers_remove(name: str) -> None:
    """Removes a registered LLM provider and its key's Secret block."""
    _prefect_ready(get_settings())
    from prefect.blocks.system import Secret

    from kiln.blocks.llm import LlmProvider, key_block_name

    try:
        LlmProvider.delete(name)
    except Exception as exc:  # noqa: BLE001 - Prefect says not found in several ways
        _fail(f"{name}: no such LLM provider ({exc})")
    try:
        Secret.delete(key_block_name(name))
    except Exception:  # noqa: BLE001 - a provider without a key has no Secret block
        pass
    typer.echo(f"LLM provider {name!r} removed")


@llm_app.command("chat")
def llm_chat(
    model: str = typer.Argument(..., help="A model a registered provider serves (`kiln llm providers list`)."),
    prompt: str = typer.Argument(..., help="What to ask."),
    system: Optional[str] = typer.Option(None, help="A system prompt."),
    max_tokens: int = typer.Option(1024, min=1, help="Most tokens the answer may have."),
    temperature: Optional[float] = typer.Option(None, min=0, max=2, help="Sampling temperature; the provider's "
                                                "default unset."),  # fmt: skip
) -> None:
    """Asks a model through kiln and prints the answer as it streams in; the call is an llm_proxy job."""
    from kiln.errors import KilnError

    printed = False
    with _client() as client:
        try:
            for delta in client.llm.chat(model, [{"role": "user", "content": prompt}], stream=True, system=system,
                                         max_tokens=max_tokens, temperature=temperature):  # fmt: skip
                typer.echo(delta, nl=False)  # click flushes after each
                printed = True
        except KilnError as exc:
            if printed:
                typer.echo()  # the error goes on a line of its own, after the partial answer
            _fail(f"error: {exc.message}")
    typer.echo()


# jobs


def _client():
    from kiln.sdk import Client

    settings = get_settings()
    key = settings.api_key
    if key is None:
        key_file = settings.home_dir / "api-key"
        if not key_file.exists():
            _fail("no API key: set KILN_API_KEY, or run `kiln up` (it writes KILN_HOME/api-key)")
        key = key_file.read_text().strip()
    return Client(settings.api_url, key)


def _run(call):
    from kiln.errors import KilnError

    try:
        return call()
    except KilnError as exc:
        _fail(f"error: {exc.message}")


@app.command()
def submit(
    type: str = typer.Argument(..., help="The job type, e.g. sleep."),
    input: str = typer.Option("{}", "--input", help="The input as JSON, or @file with JSON in it."),
    priority: int = typer.Option(0, help="Higher runs first."),
    compute_target: Optional[str] = typer.Option(None, "--compute-target", help="'local' or a registered cluster."),
) -> None:
    """Submits a job and prints its id."""
    text = Path(input[1:]).read_text() if input.startswith("@") else input
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"--input: not valid JSON ({exc})")
    with _client() as client:
        job = _run(lambda: client.jobs.create(type=type, input=payload, priority=priority,
                                                    compute_target=compute_target))
    typer.echo(job.id)


@app.command()
def status(job_id: str) -> None:
    """Prints a job as JSON."""
    with _client() as client:
        job = _run(lambda: client.jobs.get(job_id))
    typer.echo(job.data.model_dump_json(indent=2))


@app.command()
def cancel(job_id: str) -> None:
    """Cancels a job and its children."""
    with _client() as client:
        job = _run(lambda: client.jobs.cancel(job_id))
    typer.echo(f"{job.id}: {job.status.value}")


@app.command()
def watch(job_id: str) -> None:
    """Shows a job's progress live until it ends."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kiln.schemas import JobStatus

    with _client() as client:
        job = _run(lambda: client.jobs.get(job_id))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task(f"{job.type} {job.id[:8]} {job.status.value}", total=100)
            for event in client.jobs.events(job_id):
                if event.event == "status":
                    bar.update(task, description=f"{job.type} {job.id[:8]} {event.data['status']}")
                elif event.event == "progress":
                    bar.update(task, completed=event.data["percent"],
                               description=f"{job.type} {job.id[:8]} {event.data.get('message') or ''}")
                else:
                    if event.event == "completed":
                        bar.update(task, completed=100)
                    bar.update(task, description=f"{job.type} {job.id[:8]} {event.event}")
        job = client.jobs.get(job_id)
    succeeded = job.status in (JobStatus.COMPLETED, JobStatus.CACHE_HIT)
    typer.echo(json.dumps(job.output) if succeeded else f"{job.status.value}: {job.status_reason}")
    if not succeeded:
        raise typer.Exit(1)


@batch_app.command("submit")
def batch_submit(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON Lines: one job (or batch entry) a line."),
    chunk: int = typer.Option(1000, min=1, help="Jobs per batch; more lines go in more batches."),
) -> None:
    """Submits the file's jobs as batches; prints each batch's id and counts, and the failed lines."""
    payloads = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                payloads.append(json.loads(line))
            except json.JSONDecodeError as exc:
                _fail(f"{path}: line {number} is not JSON ({exc.msg})")
    with _client() as client:
        results = _run(lambda: client.submit_batches(payloads, chunk=chunk))
    for number, result in enumerate(results):
        typer.echo(f"batch {result.batch_id}: {result.submitted} submitted, {result.cache_hits} cache hits, "
                   f"{result.failed} failed")  # fmt: skip
        for index, line in enumerate(result.jobs):
            if line.status == "failed":
                typer.echo(f"  job {number * chunk + index + 1}: {line.error}", err=True)


@batch_app.command("status")
def batch_status(batch_id: str, watch: bool = typer.Option(True, help="Follow the counts live until all end.")) -> None:
    """Shows a batch's jobs per status, as a live bar until every job has ended."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with _client() as client:
        batch = _run(lambda: client.batch(batch_id))
        counts = batch.counts
        if watch:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()) as bar:
                task = bar.add_task("", total=batch.size)
                for counts in client.batch_counts(batch_id):
                    ended = counts["succeeded"] + counts["failed"] + counts["cancelled"] + counts["cache_hit"]
                    bar.update(task, completed=ended, description=_counts_line(counts))
    typer.echo(_counts_line(counts))


def _counts_line(counts: dict[str, int]) -> str:
    return "  ".join(f"{name} {count}" for name, count in counts.items() if count)


@app.command()
def jobs(
    type: Optional[str] = typer.Option(None, help="Only this job type."),
    status: Optional[str] = typer.Option(None, help="Only this status."),
    limit: int = typer.Option(20, help="How many, newest first."),
) -> None:
    """Lists the project's jobs as a table."""
    from rich.console import Console
    from rich.table import Table

    with _client() as client:
        page = _run(lambda: client.jobs.list(type=type, status=status, limit=limit))
    table = Table("id", "type", "status", "priority", "created", "reason")
    for job in page.jobs:
        table.add_row(job.id, job.type, job.status.value, str(job.priority),
                      job.created_at.strftime("%Y-%m-%d %H:%M:%S"), (job.status_reason or "")[:60])
    Console().print(table)


@files_app.command("put")
def files_put(paths: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="Files to upload.")) -> None:
    """Uploads files to the project under their names (a job's input names them); prints name, sha256, size."""
    with _client() as client:
        for path in paths:
            stored = _run(lambda: client.files.upload(path))
            typer.echo(f"{stored.name}\t{stored.sha256}\t{stored.size}")


@mcp_app.command("deploy")
def mcp_deploy(
    name: str = typer.Argument(..., help="The deployment's name: its URL is /api/v1/mcp/NAME/mcp."),
    command: Optional[str] = typer.Option(None, help="The server's command line (split as a shell would)."),
    url: Optional[str] = typer.Option(None, help="A remote streamable-HTTP server kiln fronts instead."),
    plugin: Optional[str] = typer.Option(None, help="A registered plugin whose image serves over stdio, sandboxed."),
    transport: Optional[str] = typer.Option(None, help="stdio or streamable-http (for a command; stdio by default)."),
    replicas: int = typer.Option(1, help="Copies of the server."),
    env: list[str] = typer.Option([], help="K=V, an environment variable of the server (repeatable)."),
    cpus: Optional[float] = typer.Option(None, help="CPU cores each replica may keep busy."),
    memory_mb: Optional[int] = typer.Option(None, help="Memory of each replica, its processes together."),
    pids: Optional[int] = typer.Option(None, help="Processes and threads of each replica alive at once."),
) -> None:
    """Deploys an MCP server as an mcp_host job; prints its job id and URL."""
    import shlex

    from kiln.sdk.client import mcp_input

    for item in env:
        if "=" not in item:
            _fail(f"--env: give K=V, not {item!r}")
    options: dict[str, Any] = {"env": dict(item.partition("=")[::2] for item in env)} if env else {}
    limits = {k: v for k, v in (("cpus", cpus), ("memory_mb", memory_mb), ("pids", pids)) if v is not None}
    if limits:
        options["limits"] = limits
    try:
        body = mcp_input(name, shlex.split(command) if command else None, url, plugin, transport, replicas, options)
    except ValueError as exc:
        _fail(f"--command/--url/--plugin: {exc}")
    with _client() as client:
        job = _run(lambda: client.jobs.create("mcp_host", body))
        typer.echo(f"{job.id}\t{client.mcp.url(name)}")


@mcp_app.command("list")
def mcp_list() -> None:
    """Lists the project's deployments not over: name, job, status and health, URL."""
    with _client() as client:
        for job in _run(client.mcp.list):
            name = job.input.get("name")
            typer.echo(f"{name}\t{job.id}\t{job.status.value}\t{job.status_reason or ''}\t{client.mcp.url(name)}")


@mcp_app.command("scale")
def mcp_scale(name: str, replicas: int = typer.Argument(..., help="The new number of replicas.")) -> None:
    """Changes a deployment's replicas live: new ones start, extra ones drain."""
    with _client() as client:
        job = _run(lambda: client.mcp.scale(name, replicas))
        typer.echo(f"{name}: {replicas} replica(s) ({job.status_reason or job.status.value})")


@mcp_app.command("logs")
def mcp_logs(name: str) -> None:
    """Follows a deployment's events (starting, healthy, unhealthy, restarting, scaled) until it ends or Ctrl-C."""
    with _client() as client:
        job = _run(lambda: client.mcp.get(name))
        _run(lambda: _follow(client, job.id))


def _follow(client, job_id: str) -> None:
    for event in client.jobs.events(job_id):
        typer.echo(f"{event.event}\t{json.dumps(event.data)}")


@mcp_app.command("stop")
def mcp_stop(name: str) -> None:
    """Stops a deployment: its replicas end, its URL answers 404."""
    with _client() as client:
        job = _run(lambda: client.mcp.stop(name).wait(timeout=60))
        typer.echo(f"{name}: {job.status.value}")


@files_app.command("list")
def files_list() -> None:
    """Lists the project's uploads: name, sha256 and size, by name."""
    with _client() as client:
        for stored in _run(client.files.list):
            typer.echo(f"{stored.name}\t{stored.sha256}\t{stored.size}")


@files_app.command("get")
def files_get(
    job_id: str = typer.Argument(..., help="The job whose files to download."),
    name: Optional[str] = typer.Argument(None, help="One file of the job; all of them when left out."),
    output: Path = typer.Option(Path("."), "--output", "-o", file_okay=False, help="The folder to save into."),
) -> None:
    """Downloads a job's files (or one of them) into a folder; prints each path written."""
    output.mkdir(parents=True, exist_ok=True)
    with _client() as client:
        names = [name] if name is not None else [f.name for f in _run(lambda: client.jobs.files(job_id))]
        if not names:
            typer.echo(f"job {job_id} has no files", err=True)
        for each in names:
            typer.echo(_run(lambda: client.jobs.download(job_id, each, output)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
