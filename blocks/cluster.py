"""An HPC cluster as a Prefect Block: where `hpc_submit` jobs run, through dask-jobqueue.

A cluster is registered by name (`kiln clusters add NAME …`, or `prefect block register -m
kiln.blocks.cluster` and the Prefect UI) and a job names it as its `compute_target`. Every batch
job kiln submits to it runs one Dask worker on one node; the block's cores, memory and walltime
are each batch job's size and also the most a kiln job may ask for.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any, ClassVar, Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from kiln.blocks import registered
from kiln.schemas.resources import Resources

_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)\s*$", re.IGNORECASE)
_MEMORY_GB = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}


def walltime_seconds(walltime: str) -> int:
    """'01:30:00' or '1-00:00:00' (days-hours:minutes:seconds) in seconds."""
    match = _WALLTIME.match(walltime.strip())
    if match is None:
        raise ValueError(f"walltime {walltime!r} is not HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_walltime(seconds: float) -> str:
    """Seconds as HH:MM:SS, rounded up to whole minutes: SLURM and PBS count time limits in minutes."""
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def memory_gb(memory: str) -> float:
    """'4GB', '512MB', '2GiB' in GB (powers of ten, as dask-jobqueue reads them)."""
    match = _MEMORY.match(memory)
    if match is None:
        raise ValueError(f"memory {memory!r} is not a size such as '4GB' or '512MB'")
    return float(match.group(1)) * _MEMORY_GB[match.group(2)[0].upper()]


class HpcCluster(Block):
    """A SLURM or PBS cluster kiln submits batch jobs to through dask-jobqueue."""

    _block_type_name: ClassVar[str] = "kiln HPC cluster"
    _block_type_slug: ClassVar[str] = "kiln-hpc-cluster"
    _description: ClassVar[str] = "A SLURM or PBS cluster that kiln's hpc_submit jobs run on, through dask-jobqueue."

    scheduler: Literal["slurm", "pbs"] = Field(description="The batch system: slurm or pbs.")
    queue: str | None = Field(None, description="Partition (SLURM) or queue (PBS) the batch jobs go to.")
    account: str | None = Field(None, description="Account (SLURM) or project (PBS) the batch jobs are charged to.")
    cores: int = Field(1, ge=1, description="Cores of one batch job; also the most cpu_count a job may ask for.")
    memory: str = Field(
        "2GB", description="Memory of one batch job, e.g. '4GB'; also the most min_ram_gb a job may ask."
    )
    walltime: str = Field(
        "01:00:00", description="Walltime of one batch job (HH:MM:SS); also the longest max_timeout_run_ms allowed."
    )
    processes: int = Field(1, ge=1, description="Dask worker processes per batch job; the cores are shared among them.")
    max_jobs: int = Field(
        4, ge=1, description="Most batch jobs (one node each) one kiln job holds at once; caps max_node_count."
    )
    slots: int | None = Field(
        None, ge=1, description="Most unfinished kiln jobs the cluster takes at once (a batch counts against it); "
        "no limit when unset."
    )
    job_extra_directives: list[str] = Field(
        default_factory=list, description="Extra scheduler directives, e.g. ['--qos=long'] or ['-l place=scatter']."
    )
    job_script_prologue: list[str] = Field(
        default_factory=list, description="Shell lines run before the worker starts, e.g. ['module load python/3.11']."
    )
    python: str | None = Field(None, description="The Python that runs the workers on the nodes; this one by default.")
    scheduler_host: str = Field(
        "127.0.0.1",
        description="Address of the kiln worker's machine as the nodes reach it (the Dask scheduler's host).",
    )
    log_directory: str | None = Field(
        None, description="Where the batch jobs write their output; none kept by default."
    )

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, value: str) -> str:
        walltime_seconds(value)
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        memory_gb(value)
        return value

    def unmet(self, resources: Resources, name: str = "") -> str | None:
        """Why this cluster cannot run a job asking for `resources`, naming the limit; None when it can."""
        where = f"cluster {name!r}" if name else "the cluster"
        if resources.gpu_count:
            return f"resources.gpu_count={resources.gpu_count}: {where} offers no GPUs"
        if resources.cpu_count > self.cores:
            return f"resources.cpu_count={resources.cpu_count} exceeds {where}'s {self.cores} cores per batch job"
        if resources.min_ram_gb > memory_gb(self.memory):
            return f"resources.min_ram_gb={resources.min_ram_gb:g} exceeds {where}'s {self.memory} per batch job"
        if resources.max_timeout_run_ms and resources.max_timeout_run_ms / 1000 > walltime_seconds(self.walltime):
            return (
                f"resources.max_timeout_run_ms={resources.max_timeout_run_ms} exceeds {where}'s walltime "
                f"{self.walltime}"
            )
        if resources.max_node_count > self.max_jobs:
            return (
                f"resources.max_node_count={resources.max_node_count} exceeds {where}'s {self.max_jobs} "
                f"batch jobs (nodes) at once"
            )
        return None

    def job_options(self, resources: Resources, job_name: str = "kiln") -> dict[str, Any]:
        """dask-jobqueue's keyword arguments for batch jobs sized to the job's resources."""
        cores = resources.cpu_count or self.cores
        memory = f"{resources.min_ram_gb:g}GB" if resources.min_ram_gb else self.memory
        walltime = (
            format_walltime(resources.max_timeout_run_ms / 1000) if resources.max_timeout_run_ms else self.walltime
        )
        options: dict[str, Any] = {
            "queue": self.queue,
            "account": self.account,
            "cores": cores,
            "memory": memory,
            "processes": min(self.processes, cores),
            "walltime": walltime,
            "job_name": job_name,
            "job_extra_directives": list(self.job_extra_directives),
            "job_script_prologue": list(self.job_script_prologue),
            "python": self.python or sys.executable,
            "log_directory": self.log_directory,
            "scheduler_options": {"host": self.scheduler_host, "dashboard_address": None, "dashboard": False},
            # a worker that cannot reach its scheduler for this long exits and frees the node
            "death_timeout": 60,
        }
        if self.scheduler == "slurm":
            options["job_extra_directives"].insert(0, "--nodes=1")
        if self.log_directory is None:
            # otherwise each batch job leaves its output file in the kiln worker's working directory
            options["job_extra_directives"][:0] = (
                ["--output=/dev/null"] if self.scheduler == "slurm" else ["-o /dev/null", "-e /dev/null"]
            )
        return {key: value for key, value in options.items() if value is not None}

    def dask_cluster(self, resources: Resources, *, job_name: str = "kiln", asynchronous: bool = True):
        """A dask-jobqueue cluster (not yet scaled) whose batch jobs fit the job's resources."""
        PBSCluster, SLURMCluster = _dask_jobqueue()
        cluster_class = SLURMCluster if self.scheduler == "slurm" else PBSCluster
        return cluster_class(asynchronous=asynchronous, **self.job_options(resources, job_name))

    def summary(self, name: str) -> dict[str, Any]:
        """What GET /api/v1/clusters shows of the cluster."""
        return {"name": name, **self.model_dump(mode="json", exclude={"block_type_slug"})}


def _dask_jobqueue():
    """dask_jobqueue's PBSCluster and SLURMCluster, importable from any thread.

    dask_jobqueue.runner installs a SIGINT handler at import, which Python allows only in the main
    thread; a flow runs in a kiln worker's thread. The handler serves dask-jobqueue's own runner
    CLI, which kiln does not use, so it is skipped when imported elsewhere.
    """
    import signal
    import threading

    if "dask_jobqueue" not in sys.modules and threading.current_thread() is not threading.main_thread():
        original = signal.signal
        signal.signal = lambda *args, **kwargs: None
        try:
            import dask_jobqueue  # noqa: F401
        finally:
            signal.signal = original
    from dask_jobqueue import PBSCluster, SLURMCluster

    return PBSCluster, SLURMCluster


async def registered_clusters() -> dict[str, HpcCluster]:
    """Every registered cluster by name, read from the Prefect API."""
    return await registered(HpcCluster)


async def load_cluster(name: str) -> HpcCluster | None:
    """The registered cluster called `name`, or None."""
    try:
        return await HpcCluster.aload(name)
    except ValueError:
        return None
