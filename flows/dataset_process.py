"""The `dataset_process` job: convert, filter, featurize and validate a dataset of structures, in partitions on Dask.

The source is split into partitions once; each partition is a Prefect task run on the kiln worker's Dask
cluster (its warm processes keep pymatgen, matminer and models loaded), persisted when it finishes, so a retry
after a worker's death runs only the others. The output is the dataset in the asked format, the errors table
and, when rows were quarantined, the quarantine table, as the job's files; the counts per step are in the
job's output and in a markdown artifact on the flow run, the validation failures in a table artifact.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Failed

from kiln.runtime import current_job, dask_scheduler_address, report_progress
from kiln.schemas.dataset_process import DatasetProcessInput
from kiln.schemas.job_types import JobType
from kiln.settings import get_settings

# a partition whose Dask process died (killed, out of memory) is run again this many times before the job fails
PARTITION_ATTEMPTS = 2
# rows of validation failures shown in the flow run's table artifact; the errors table has them all
ARTIFACT_ROWS = 500


@flow(name="dataset_process", persist_result=True, result_serializer="json")
async def dataset_process(input: DatasetProcessInput):
    # the work waits on Dask futures and writes files: in a thread, as ml_predict's does, off the flow's event loop
    return await asyncio.to_thread(process_dataset, input)


def process_dataset(request: DatasetProcessInput):
    from prefect.context import SyncClientContext

    from kiln.files import upload_path
    from kiln.tasks.dataset import executors as steps
    from kiln.tasks.dataset.partitions import NOT_A_DATASET, PartitionStore, write_outputs
    from kiln.tasks.dataset.steps import PipelineFailed, SchemaMismatch, finish

    logger = get_run_logger()
    started = time.perf_counter()
    job_id = current_job()[0]
    settings = get_settings()
    root = settings.results_dir / "datasets" / job_id if job_id else Path(tempfile.mkdtemp(prefix="kiln-dataset-"))
    store = PartitionStore(root)
    # an earlier dataset job's errors and quarantine tables are pinned with its dataset, but are not rows
    skipped = NOT_A_DATASET if request.source.job else ()
    sources = [(str(upload_path(file)), file.name) for file in request.source.files if file.name not in skipped]
    models_path = [str(p) for p in settings.models_path]
    with SyncClientContext.get_or_create():
        count = steps.split_dataset(str(root), sources, request.format, request.partition_rows)
        done_before = [index for index in range(count) if store.finished(index)]
        if done_before:
            logger.info("resuming: %d of %d partitions finished in an earlier attempt", len(done_before), count)
        failure = None
        try:
            _run_partitions(str(root), count, set(done_before), request, models_path)
        except PipelineFailed as exc:
            failure = exc
        except SchemaMismatch as exc:  # the dataset lacks a column the schema requires: no row is to blame
            return Failed(message=str(exc))
        results = [store.load(index) for index in range(count) if store.finished(index)]
        try:
            total = finish(results, request)
        except PipelineFailed as exc:  # a column that must be unique, with policy fail
            failure, total = exc, finish(results, request, unique=False)
        if failure is not None and failure.error not in total.errors:
            total.errors.append(failure.error)  # the failing partition saved nothing
        files = write_outputs(total, request.output_format, store.out)
        stored = _store(job_id, files)
    output = {
        "rows_in": total.counts[0].rows_in if total.counts else 0,
        "rows_out": len(total.rows),
        "rows_failed": len({e["row_id"] for e in total.errors}),
        "quarantined": len(total.quarantined),
        "steps": [count.as_dict() for count in total.counts],
        "columns": sorted({name for row in total.rows for name in row.properties}),
        "files": {name: {"size": f.size, "sha256": f.sha256} for name, f in stored.items()},
        "output_format": request.output_format,
        "partitions": count,
        "resumed_partitions": len(done_before),
        "seconds": round(time.perf_counter() - started, 3),
    }
    _report(job_id, output, total.errors, request)
    if failure is not None:
        return Failed(message=str(failure), data=output)
    return output


def _run_partitions(root: str, count: int, done: set[int], request, models_path: list[str]) -> None:
    """Runs the unfinished partitions as Prefect tasks on the worker's Dask cluster (in this process when the flow
    is not on one), reporting progress as each ends. PipelineFailed from the first partition that hits a `fail`."""
    from kiln.tasks.dataset import executors as steps

    todo = [index for index in range(count) if index not in done]
    finished = len(done)

    def progress() -> None:
        report_progress(100 * finished / count, f"{finished} of {count} partitions")

    if not todo:
        return
    progress()
    address = dask_scheduler_address()
    if address is None:
        for index in todo:
            steps.process_partition(root, index + 1, count, request, models_path)
            finished += 1
            progress()
        return
    from distributed import as_completed
    from prefect_dask.client import PrefectDaskClient

    from kiln.tasks.dataset.steps import PipelineFailed

    client = PrefectDaskClient(address, set_as_default=False)
    partition_of: dict[str, int] = {}  # Dask key -> partition
    tries: dict[int, int] = {}

    def submit(index: int):
        future = client.submit(steps.process_partition, root=root, index=index + 1, count=count, request=request,
                               models_path=models_path, pure=False)  # fmt: skip
        partition_of[future.key] = index
        tries[index] = tries.get(index, 0) + 1
        return future

    try:
        running = as_completed([submit(index) for index in todo], loop=client.loop)
        for future in running:
            index = partition_of[future.key]
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - a dead process is retried; anything else ends the job
                died = type(exc).__name__ == "KilledWorker" and not isinstance(exc, PipelineFailed)
                if not died or tries[index] >= PARTITION_ATTEMPTS:
                    for other in running.futures:
                        other.cancel()
                    raise
                get_run_logger().warning("partition %d: its Dask process died (%s); running it again", index + 1, exc)
                running.add(submit(index))
                continue
            finished += 1
            progress()
    finally:
        client.close()


def _store(job_id: str | None, files: dict[str, Path]) -> dict:
    from kiln.files import store_job_files

    if job_id is None:
        import hashlib

        return {name: _Local(path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
                for name, path in files.items()}  # fmt: skip
    return {stored.name: stored for stored in store_job_files(job_id, files)}


class _Local:
    def __init__(self, size: int, sha256: str):
        self.size, self.sha256 = size, sha256


def _report(job_id: str | None, output: dict, errors: list[dict], request: DatasetProcessInput) -> None:
    """The counts as a markdown artifact and the validation failures as a table artifact on the flow run."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
    from prefect.utilities.asyncutils import run_coro_as_sync

    # the async variants, run to their end: from this thread of an async flow the sync ones hand back a coroutine

    key = f"dataset-{job_id[:8]}" if job_id else None
    lines = [f"### dataset_process: {output['rows_in']} rows in, {output['rows_out']} out, "
             f"{output['rows_failed']} failed, {output['quarantined']} quarantined",
             "", "| step | in | out | filtered | failed | seconds |", "|---|---|---|---|---|---|"]  # fmt: skip
    for count in output["steps"]:
        name = count["step"] if count["step_index"] is None else f"steps.{count['step_index']} {count['step']}"
        lines.append(f"| {name} | {count['in']} | {count['out']} | {count['filtered']} | {count['failed']} | "
                     f"{count['seconds']} |")  # fmt: skip
    lines += ["", f"{output['partitions']} partition(s) of up to {request.partition_rows} rows"
              + (f", {output['resumed_partitions']} resumed from an earlier attempt" if output["resumed_partitions"]
                 else "") + ". Files: " + ", ".join(f"`{name}`" for name in output["files"]) + "."]  # fmt: skip
    run_coro_as_sync(acreate_markdown_artifact("\n".join(lines), key=f"{key}-counts" if key else None,
                                               description="Rows in, out, filtered and failed at each step"))
    failures = [e for e in errors if e["step"] == "validate"][:ARTIFACT_ROWS]
    none = {"row_id": None, "step": "validate", "step_index": None, "error_type": None,
            "message": "no row failed validation"}  # fmt: skip
    run_coro_as_sync(acreate_table_artifact(
        failures or [none], key=f"{key}-validation" if key else None,
        description=f"Validation failure cases (the first {ARTIFACT_ROWS}; errors.parquet has every failed row)"))

JOB_TYPE = JobType(
    name="dataset_process",
    description="Converts, filters, featurizes (matminer; a kiln ML model's energies) and validates (pandera, "
    "structure sanity) a dataset of structures in partitions on the worker's Dask cluster; the dataset, an errors "
    "table and a validation report back.",
    input_model=DatasetProcessInput,
    flow=dataset_process,
    requires=("pymatgen", "ase", "matminer", "pandera", "pyarrow", "rdkit"),
    check="kiln.tasks.dataset.steps:require_models",
    versions="kiln.tasks.dataset.steps:model_versions",
    input_files="source.files",
    input_job="source.job",
    fans_out=True,
    tags=("dataset",),
)
