"""A dataset job's partitions on disk, so that a retry resumes from the last finished one; no Prefect here.

    <work dir>/                   KILN_HOME/results/datasets/<job id>: shared by the API and every worker
      plan.json                   how many partitions; written once the source is split
      input-00000.pkl             a partition's entries, unparsed
      done-00000.pkl              its PartitionResult, written whole and renamed into place when it finished
      out/                        the job's files, before they are stored

A retry of the job (a new flow run, the same job id) finds the plan and the finished partitions and runs only
the others. Every file is written to a temporary name and renamed, so a process killed mid-write leaves none
half written.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from collections.abc import Iterable
from pathlib import Path

from kiln.tasks.dataset.formats import OUTPUT_SUFFIX, Entry, Row, rows_table, split_entries, write_dataset
from kiln.tasks.dataset.steps import ERROR_COLUMNS, PartitionResult

# the job files a dataset job leaves
DATASET_NAME = "dataset"
ERRORS_FILE = "errors.parquet"
QUARANTINE_FILE = "quarantine.parquet"
# files an earlier job leaves that are not its dataset (a dataset_process job's side tables)
NOT_A_DATASET = (ERRORS_FILE, QUARANTINE_FILE)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class PartitionStore:
    """The partitions of one job under its work dir."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def planned(self) -> int | None:
        """How many partitions the source was split into, or None before it was split."""
        try:
            return json.loads((self.root / "plan.json").read_text())["partitions"]
        except FileNotFoundError:
            return None

    def split(self, sources: Iterable[tuple[Path, str]], fmt: str, partition_rows: int) -> int:
        """Cuts the source files (path, name) into partitions of `partition_rows` entries; how many partitions."""
        count, chunk = 0, []
        for path, name in sources:
            for entry in split_entries(path, fmt, name):
                chunk.append(entry)
                if len(chunk) == partition_rows:
                    self._write_input(count, chunk)
                    count, chunk = count + 1, []
        if chunk or count == 0:
            self._write_input(count, chunk)
            count += 1
        _write_atomically(self.root / "plan.json", json.dumps({"partitions": count}).encode())
        return count

    def _write_input(self, index: int, entries: list[Entry]) -> None:
        _write_atomically(self.root / f"input-{index:05d}.pkl", pickle.dumps(entries, protocol=5))

    def entries(self, index: int) -> list[Entry]:
        return pickle.loads((self.root / f"input-{index:05d}.pkl").read_bytes())

    def finished(self, index: int) -> bool:
        return (self.root / f"done-{index:05d}.pkl").exists()

    def save(self, index: int, result: PartitionResult) -> None:
        _write_atomically(self.root / f"done-{index:05d}.pkl", pickle.dumps(result, protocol=5))

    def load(self, index: int) -> PartitionResult:
        return pickle.loads((self.root / f"done-{index:05d}.pkl").read_bytes())

    @property
    def out(self) -> Path:
        folder = self.root / "out"
        folder.mkdir(exist_ok=True)
        return folder


def write_outputs(result: PartitionResult, output_format: str, folder: Path) -> dict[str, Path]:
    """The job's files from the joined partitions: the dataset, the errors table, and the quarantine table when a
    row was quarantined. Returns {file name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    files = {}
    name = DATASET_NAME + OUTPUT_SUFFIX[output_format]
    files[name] = write_dataset(result.rows, output_format, folder / name)
    errors = {column: [error[column] for error in result.errors] for column in ERROR_COLUMNS}
    schema = pa.schema([("row_id", pa.string()), ("step", pa.string()), ("step_index", pa.int64()),
                        ("error_type", pa.string()), ("message", pa.string())])  # fmt: skip
    pq.write_table(pa.Table.from_pydict(errors, schema=schema), folder / ERRORS_FILE)
    files[ERRORS_FILE] = folder / ERRORS_FILE
    if result.quarantined:
        table = quarantine_table([row for row, _ in result.quarantined], [error for _, error in result.quarantined])
        pq.write_table(pa.Table.from_pydict(table), folder / QUARANTINE_FILE)
        files[QUARANTINE_FILE] = folder / QUARANTINE_FILE
    return files


def quarantine_table(rows: list[Row], errors: list[dict]) -> dict[str, list]:
    """Quarantined rows as columns: the row as the dataset has it (a row that could not be read: structure null,
    its entry's text in `raw_entry`), and the step and error that put it there."""
    readable = [row for row in rows if row.structure is not None]
    table = rows_table(readable) if readable else {"row_id": [], "structure": []}
    names = [n for n in table if n not in ("row_id", "structure")]
    unreadable = [row for row in rows if row.structure is None]
    for row in unreadable:
        table["row_id"].append(row.row_id)
        table["structure"].append(None)
    for name in names:
        table[name] += [row.properties.get(name) for row in unreadable]
    extra = sorted({k for row in unreadable for k in row.properties} - set(names))
    for name in extra:
        table[name] = [None] * len(readable) + [row.properties.get(name) for row in unreadable]
    order = readable + unreadable
    by_id = {id(row): error for row, error in zip(rows, errors)}
    for column in ("step", "step_index", "error_type", "message"):
        table[f"error_{column}" if column != "error_type" else column] = [by_id[id(row)][column] for row in order]
    return table
