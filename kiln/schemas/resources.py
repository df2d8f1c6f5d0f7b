"""What a job asks of the machine that runs it, after the GPU job API's fields."""

from __future__ import annotations

from pydantic import Field

from kiln.schemas.strict import StrictRequest

# the longest timeout a job may set, a year: past it a deadline overflows the dates it is added to
MAX_TIMEOUT_MS = 365 * 24 * 3600 * 1000


class Resources(StrictRequest):
    cpu_count: int = Field(0, ge=0, description="CPU cores the job needs on its worker.")
    gpu_count: int = Field(0, ge=0, description="GPUs the job needs on its worker.")
    gpu_name: str | None = Field(None, description="A GPU model the worker must have, e.g. 'NVIDIA RTX 4090'.")
    min_ram_gb: float = Field(0, ge=0, description="Memory in GB the worker must have.")
    min_vram_gb: float = Field(0, ge=0, description="GPU memory in GB the worker must have.")
    min_storage_gb: float = Field(0, ge=0, description="Free disk in GB the worker must have.")
    max_timeout_assign_ms: int | None = Field(
        None,
        ge=1000,
        le=MAX_TIMEOUT_MS,
        description="Longest wait from submission until a worker picks the job up; past it the job fails.",
    )
    max_timeout_start_ms: int | None = Field(
        None,
        ge=1000,
        le=MAX_TIMEOUT_MS,
        description="Longest wait from a worker picking the job up until it runs; past it the job fails.",
    )
    max_timeout_run_ms: int | None = Field(
        None, ge=1000, le=MAX_TIMEOUT_MS, description="Longest the job may run; past it the job fails (a Prefect flow timeout)."
    )
    max_retry_count: int = Field(0, ge=0, le=10, description="How often a failed or crashed job is run again.")
    max_node_count: int = Field(1, ge=1, description="Most nodes the job may span (HPC jobs).")

    def unmet_by(self, offers: dict) -> str | None:
        """The first requirement these offers fail, as 'gpu_count=1', or None when all are met."""
        for field in ("cpu_count", "gpu_count", "min_ram_gb", "min_vram_gb", "min_storage_gb"):
            wanted = getattr(self, field)
            if wanted and wanted > offers.get(field.removeprefix("min_"), 0):
                return f"{field}={wanted:g}"
        if self.gpu_name and self.gpu_name not in offers.get("gpu_names", []):
            return f"gpu_name={self.gpu_name!r}"
        return None
