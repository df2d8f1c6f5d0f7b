"""Reads prefect.yaml: the work pool, the priority bands and the deployments kiln applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kiln.schemas.job_types import JobType

# the repository root in a checkout (where `prefect deploy` reads it); setup.py copies it beside this
# module in a built wheel, so `pip install .` finds it too
PROJECT_FILES = (Path(__file__).resolve().parents[1] / "prefect.yaml", Path(__file__).with_name("prefect.yaml"))

# the deployment of a job type that kiln's dispatcher creates the type's runs from, made from the
# JobType; the deployments in prefect.yaml are an operator's (a scheduled batch run), applied as written
# and left to Prefect
JOB_DEPLOYMENT = "kiln"


@dataclass(frozen=True)
class Band:
    queue: str
    min_priority: int | None
    prefect_priority: int


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str
    description: str
    tags: tuple[str, ...]
    work_queue_name: str
    # as prefect.yaml writes them: {cron | interval | rrule, timezone, active}
    schedules: tuple[dict[str, Any], ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    # as prefect.yaml writes them: Prefect deployment triggers ({type: event, expect, match, parameters, enabled})
    triggers: tuple[dict[str, Any], ...] = ()

    @property
    def serves_jobs(self) -> bool:
        return self.name == JOB_DEPLOYMENT

    @classmethod
    def of_job_type(cls, job_type: JobType, work_queue_name: str) -> DeploymentSpec:
        """The deployment kiln releases a job type's jobs to, all of it read from the type."""
        return cls(name=JOB_DEPLOYMENT, entrypoint=job_type.entrypoint, description=job_type.description,
                   tags=job_type.deployment_tags, work_queue_name=work_queue_name)  # fmt: skip

    @property
    def module(self) -> str:
        """The flow's module: `module:function` as written, or a project path under the kiln namespace
        (flows/sleep.py → kiln.flows.sleep)."""
        path = self.entrypoint.split(":")[0]
        if not path.endswith(".py"):
            return path
        return "kiln." + path.removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":")[1]


@dataclass(frozen=True)
class Project:
    work_pool: str
    bands: tuple[Band, ...]
    deployments: tuple[DeploymentSpec, ...]

    @property
    def default_queue(self) -> str:
        """The queue of priority 0, where a deployment's runs go unless the dispatcher names a band."""
        return self.band_for(0).queue

    def band_for(self, priority: int) -> Band:
        for band in self.bands:
            if band.min_priority is None or priority >= band.min_priority:
                return band
        return self.bands[-1]


def find_project_file(candidates: tuple[Path, ...] = PROJECT_FILES) -> Path:
    """kiln's own prefect.yaml: the first of `candidates` that exists."""
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"kiln's project file prefect.yaml is in none of {', '.join(map(str, candidates))}: this kiln "
        "install is incomplete; reinstall it from a checkout (pip install .), or give a file with kiln deploy --file"
    )


@lru_cache
def load_project(path: Path | None = None) -> Project:
    """The project file: `path`, or kiln's own prefect.yaml."""
    path = path or find_project_file()
    raw = yaml.safe_load(Path(path).read_text())
    return Project(
        work_pool=raw["kiln"]["work_pool"],
        bands=tuple(Band(**b) for b in raw["kiln"]["bands"]),
        deployments=tuple(
            DeploymentSpec(
                name=d["name"],
                entrypoint=d["entrypoint"],
                description=d.get("description", ""),
                tags=tuple(d.get("tags", ())),
                work_queue_name=d["work_pool"]["work_queue_name"],
                schedules=tuple(d.get("schedules") or ()),
                parameters=dict(d.get("parameters") or {}),
                triggers=tuple(d.get("triggers") or ()),
            )
            for d in raw["deployments"]
        ),
    )
