"""The job types kiln knows: for each, its input model, its flow and what it needs installed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from pydantic import BaseModel

from kiln.schemas.batch_run import BatchRunInput
from kiln.schemas.hpc_submit import HpcSubmitInput
from kiln.schemas.ml_predict import MLPredictInput
from kiln.schemas.simulation import SimulationInput
from kiln.schemas.sleep import SleepInput


@dataclass(frozen=True)
class JobType:
    name: str
    description: str
    input_model: type[BaseModel]
    # libraries the flow needs beyond kiln's own
    requires: tuple[str, ...] = field(default=())
    # "module:function" called with (input, settings) at submission; raises a KilnError when the
    # input names something this installation does not have (a model, a cluster)
    check: str | None = None
    # the flow takes the job's `compute_target` and `resources` as parameters and may run on a
    # registered HPC cluster; other types run only on kiln's own workers
    runs_on_clusters: bool = False
    # the job must name a registered cluster as its compute_target
    needs_cluster: bool = False
    # a finished job answers later ones with the same input; not for a job whose result depends on
    # more than its input (a batch run reads files that change between runs)
    cacheable: bool = True

    def check_input(self, job_input: BaseModel, settings) -> None:
        if self.check:
            module, function = self.check.split(":")
            getattr(importlib.import_module(module), function)(job_input, settings)

    async def check_job(self, job_input: BaseModel, settings, *, compute_target: str | None, resources) -> None:
        """check_input, then whether compute_target names a cluster that can meet the job's resources."""
        from kiln.errors import InvalidRequest

        self.check_input(job_input, settings)
        if compute_target in (None, "local"):
            if self.needs_cluster:
                raise InvalidRequest(
                    f"compute_target: a {self.name} job runs on a registered HPC cluster; name one "
                    "(GET /api/v1/clusters lists them, `kiln clusters add` registers one)"
                )
            return
        if not self.runs_on_clusters:
            raise InvalidRequest(
                f"compute_target: {self.name} jobs run only on kiln's own workers ('local'), "
                f"not on the cluster {compute_target!r}"
            )
        from kiln.blocks.cluster import load_cluster, registered_clusters

        cluster = await load_cluster(compute_target)
        if cluster is None:
            names = ", ".join(sorted(await registered_clusters())) or "none"
            raise InvalidRequest(
                f"compute_target: no cluster named {compute_target!r} is registered (registered: {names}); "
                "`kiln clusters add` registers one"
            )
        unmet = cluster.unmet(resources, compute_target)
        if unmet:
            raise InvalidRequest(unmet)

    @property
    def module(self) -> str:
        """The flow's module; its @flow carries the type's name, and its deployment is in prefect.yaml."""
        return f"kiln.flows.{self.name}"

    @property
    def available(self) -> bool:
        """Whether the flow and the libraries it needs are installed here."""
        return all(importlib.util.find_spec(name) is not None for name in (self.module, *self.requires))


JOB_TYPES: dict[str, JobType] = {
    jt.name: jt
    for jt in [
        JobType(
            name="sleep",
            description="Sleeps, reporting progress: the platform's own diagnostic for overhead and failure paths.",
            input_model=SleepInput,
        ),
        JobType(
            name="ml_predict",
            description="Energies, forces, stresses, relaxations and formation energies from a matgl model.",
            input_model=MLPredictInput,
            requires=("matgl", "torch", "torch_geometric", "pymatgen", "ase"),
            check="kiln.tasks.ml.models:require_model",
        ),
        JobType(
            name="hpc_submit",
            description="A registered callable or a command line run as ntasks tasks on a registered SLURM or PBS "
            "cluster (compute_target), through dask-jobqueue; per-task progress, merged output.",
            input_model=HpcSubmitInput,
            requires=("dask_jobqueue",),
            runs_on_clusters=True,
            needs_cluster=True,
        ),
        JobType(
            name="simulation",
            description="Relaxation or molecular dynamics (NVE/NVT/NPT) with a matgl potential, or a molecular "
            "single point with GFN2-xTB (tblite) or DFT (PySCF); ntasks MD replicas merged; large runs or a "
            "cluster compute_target go to an hpc_submit child job.",
            input_model=SimulationInput,
            requires=("matgl", "torch", "ase", "pymatgen", "tblite", "pyscf", "dask_jobqueue"),
            check="kiln.tasks.simulation.replicas:require_model",
            runs_on_clusters=True,
        ),
        JobType(
            name="batch_run",
            description="Reads a batch from a JSONL file or a directory of structure files and submits it; the "
            "batch's jobs are this job's children. With a cron schedule in prefect.yaml, a scheduled batch run.",
            input_model=BatchRunInput,
            cacheable=False,
        ),
    ]
}


def available_job_types() -> list[str]:
    return sorted(name for name, jt in JOB_TYPES.items() if jt.available)
