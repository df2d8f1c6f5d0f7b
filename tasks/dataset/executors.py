"""The steps of a `dataset_process` job as Prefect tasks: split the source, process a partition, write the outputs.

Thin tasks over tasks.dataset's pure functions, so the Prefect UI's run graph shows each partition, where it
ran and how long it took. A partition task runs on whichever warm process of the kiln worker's Dask cluster
is free (pymatgen and matminer stay imported there, and a model stays loaded), and persists its result, so a
retry of the job runs only the partitions that had not finished.
"""

from __future__ import annotations

import dask
from prefect import get_run_logger

from kiln.schemas.dataset_process import DatasetProcessInput
from kiln.tasks.dataset.partitions import PartitionStore
from kiln.tasks.dataset.steps import run_partition
from kiln.tasks.executor import executor

# Dask's default turns object columns of a dataframe into strings: a column of Structures would become their
# str(). kiln passes rows as Python objects, not dataframes, but a lab's step using dask.dataframe must not lose them.
dask.config.set({"dataframe.convert-string": False})


@executor(name="split dataset", task_run_name="split the dataset into partitions of {partition_rows} rows")
def split_dataset(root: str, sources: list[tuple[str, str]], fmt: str, partition_rows: int) -> int:
    """Cuts the source files into partitions on disk, once per job: a retry finds them split."""
    from pathlib import Path

    store = PartitionStore(Path(root))
    planned = store.planned()
    if planned is not None:
        get_run_logger().info("already split into %d partition(s) by an earlier attempt", planned)
        return planned
    count = store.split([(Path(path), name) for path, name in sources], fmt, partition_rows)
    get_run_logger().info("split %d file(s) into %d partition(s)", len(sources), count)
    return count


@executor(name="process partition", task_run_name="partition {index} of {count}")
def process_partition(root: str, index: int, count: int, request: DatasetProcessInput, models_path: list[str]) -> dict:
    """Reads one partition's entries and runs the pipeline on them; saves the result; returns its counts."""
    import os
    import time
    from pathlib import Path

    started = time.perf_counter()
    store = PartitionStore(Path(root))
    result = run_partition(store.entries(index - 1), request, models_path=[Path(p) for p in models_path])
    store.save(index - 1, result)
    seconds = time.perf_counter() - started
    get_run_logger().info("partition %d of %d: %d rows in, %d out, %d errors in %.2f s (pid %d)", index, count,
                          result.counts[0].rows_in, len(result.rows), len(result.errors), seconds, os.getpid())  # fmt: skip
    return {"index": index, "rows_out": len(result.rows), "errors": len(result.errors), "seconds": seconds,
            "pid": os.getpid()}  # fmt: skip
