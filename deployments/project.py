"""Reads prefect.yaml: the work pool, the priority bands and the deployments kiln applies."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

# the repository root in a checkout; a copy travels in the package for other installs
_CANDIDATES = (Path(__file__).resolve().parents[1] / "prefect.yaml", Path(__file__).with_name("prefect.yaml"))


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

    @property
    def module(self) -> str:
        """The flow's module under the kiln namespace: flows/sleep.py → kiln.flows.sleep."""
        path = self.entrypoint.split(":")[0]
        return "kiln." + path.removesuffix(".py").replace("/", ".")

    @property
    def function(self) -> str:
        return self.entrypoint.split(":")[1]


@dataclass(frozen=True)
class Project:
    work_pool: str
    bands: tuple[Band, ...]
    deployments: tuple[DeploymentSpec, ...]

    def band_for(self, priority: int) -> Band:
        for band in self.bands:
            if band.min_priority is None or priority >= band.min_priority:
                return band
        return self.bands[-1]


@lru_cache
def load_project() -> Project:
    path = next(p for p in _CANDIDATES if p.exists())
    raw = yaml.safe_load(path.read_text())
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
            )
            for d in raw["deployments"]
        ),
    )
