"""Reading a batch run's source into the entries of one batch: a JSONL file, or a directory of structure files."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# what a structure file is called: by suffix, or POSCAR/CONTCAR with or without one
STRUCTURE_SUFFIXES = (".cif", ".vasp", ".poscar", ".xyz", ".extxyz", ".json")
STRUCTURE_STEMS = ("POSCAR", "CONTCAR")


class SourceError(ValueError):
    """The source cannot be read as a batch: missing, empty, or larger than one batch."""


def resolve_source(source: str, home: Path) -> Path:
    """The source's path; a relative one is under KILN_HOME."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else home / path


def read_source(
    path: Path, job: dict[str, Any], compute_target: str | None = None, refresh: bool = False
) -> tuple[list[dict[str, Any]], dict[int, str], list[str]]:
    """(entries, unreadable entries by index with why, where each entry came from: 'line 3' or a file name).

    An unreadable entry keeps its place, as an empty entry, so every index is the line's or file's
    position; the batch reports it failed with the reason given here.
    """
    if path.is_dir():
        entries, unreadable, origins = _read_directory(path, job)
    elif path.is_file():
        entries, unreadable, origins = _read_jsonl(path)
    else:
        raise SourceError(
            f"source: {path} does not exist on the worker; give a JSONL file or a directory of structure files"
        )
    if not entries:
        what = "structure files (" + ", ".join(STRUCTURE_SUFFIXES + STRUCTURE_STEMS) + ")" if path.is_dir() else "lines"
        raise SourceError(f"source: {path} has no {what}; there is nothing to submit")
    for index, entry in enumerate(entries):
        if index in unreadable:
            continue
        if compute_target is not None and entry.get("compute_target") is None and not entry["job"].get("compute_target"):
            entry["compute_target"] = compute_target
        if refresh:
            entry["refresh"] = True
    return entries, unreadable, origins


def _read_jsonl(path: Path) -> tuple[list[dict], dict[int, str], list[str]]:
    entries: list[dict] = []
    unreadable: dict[int, str] = {}
    origins: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        index = len(entries)
        origins.append(f"line {number}")
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            unreadable[index] = f"jobs.{index}: line {number} of {path.name} is not JSON ({exc.msg} at column {exc.colno})"
            entries.append({})
            continue
        if isinstance(value, dict) and "job" in value:
            entries.append(value)
        elif isinstance(value, dict) and "type" in value:
            entries.append({"job": value})
        else:
            unreadable[index] = (
                f"jobs.{index}: line {number} of {path.name} is neither a batch entry {{job, compute_target, refresh}} "
                "nor a job {type, input}"
            )
            entries.append({})
    return entries, unreadable, origins


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in STRUCTURE_SUFFIXES or path.name.startswith(STRUCTURE_STEMS))


def _read_directory(path: Path, job: dict[str, Any]) -> tuple[list[dict], dict[int, str], list[str]]:
    entries: list[dict] = []
    unreadable: dict[int, str] = {}
    files = sorted(p for p in path.iterdir() if _is_structure_file(p))
    for index, file in enumerate(files):
        try:
            text = file.read_text()
            structure = json.loads(text) if file.suffix.lower() == ".json" else text
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            unreadable[index] = f"jobs.{index}: {file.name} could not be read as a structure file ({exc})"
            entries.append({})
            continue
        entry_job = copy.deepcopy(job)
        entry_job["input"] = {**(entry_job.get("input") or {}), "structure": structure}
        entries.append({"job": entry_job})
    return entries, unreadable, [file.name for file in files]
