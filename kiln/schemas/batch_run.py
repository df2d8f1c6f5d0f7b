"""Input of the `batch_run` job: where its batch is read from, and what each structure of a directory becomes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from kiln.schemas.batches import Hardware
from kiln.schemas.jobs import JobCreate

# what each structure of a directory becomes when the batch run names no job
DEFAULT_STRUCTURE_JOB = {"type": "ml_predict", "input": {"property": "energy"}}


class BatchRunInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        min_length=1,
        description="Where the batch is read from, on the worker: a JSONL file with one entry a line (an entry of "
        "POST /api/v1/jobs/submit-batch, {job, compute_target, refresh}, or a bare job {type, input, …}), or a "
        "directory whose structure files (CIF, POSCAR/CONTCAR/*.vasp, extended XYZ, pymatgen JSON) each become a "
        "job. A relative path is under KILN_HOME.",
    )
    job: JobCreate = Field(
        default_factory=lambda: JobCreate.model_validate(DEFAULT_STRUCTURE_JOB),
        description="For a directory: the job each structure becomes, as for POST /api/v1/jobs; the structure "
        "goes into its input as `structure`. Unused for a JSONL file.",
    )
    compute_target: str | None = Field(None, description="Where the batch's jobs run, for entries that name nowhere.")
    hardware: Hardware | None = Field(None, description="Hardware applied to every job of the batch.")
    refresh: bool = Field(False, description="Run every entry again, even those a finished job already answers.")

    def estimated_hours(self) -> float:
        """Reading the source: a minute. The jobs it submits are charged as a batch of their own."""
        return 1 / 60
