"""A batch run's source read into batch entries: JSONL lines and directories of structure files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.schemas.batch_run import DEFAULT_STRUCTURE_JOB, BatchRunInput
from kiln.tasks.batch_run.source import SourceError, read_source, resolve_source

POSCAR = """Na Cl
1.0
5.6 0 0
0 5.6 0
0 0 5.6
Na Cl
1 1
direct
0 0 0
0.5 0.5 0.5
"""


def test_jsonl_lines_become_entries_in_place_and_bad_lines_keep_their_index(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        json.dumps({"job": {"type": "sleep", "input": {"seconds": 1}}, "compute_target": "hpc"}),
        "   ",
        json.dumps({"type": "sleep", "input": {"seconds": 2}}),
        "{oops",
        json.dumps([1, 2]),
        json.dumps({"type": "sleep", "input": {"seconds": 3}, "compute_target": "mine"}),
    ]))  # fmt: skip
    entries, unreadable, origins = read_source(path, DEFAULT_STRUCTURE_JOB, compute_target="local", refresh=True)
    assert origins == ["line 1", "line 3", "line 4", "line 5", "line 6"]
    assert entries[0] == {"job": {"type": "sleep", "input": {"seconds": 1}}, "compute_target": "hpc", "refresh": True}
    assert entries[1] == {"job": {"type": "sleep", "input": {"seconds": 2}}, "compute_target": "local", "refresh": True}
    # an entry whose job names a target keeps it
    assert "compute_target" not in entries[4] and entries[4]["job"]["compute_target"] == "mine"
    assert entries[2] == entries[3] == {}
    assert unreadable[2].startswith("jobs.2: line 4 of jobs.jsonl is not JSON")
    assert unreadable[3].startswith("jobs.3: line 5 of jobs.jsonl is neither a batch entry")


def test_each_structure_file_of_a_directory_becomes_the_template_job(tmp_path):
    (tmp_path / "b.cif").write_text("data_x\n")
    (tmp_path / "POSCAR").write_text(POSCAR)
    (tmp_path / "a.json").write_text(json.dumps({"@class": "Structure"}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "README.md").write_text("skipped")
    (tmp_path / "sub.cif").mkdir()
    template = {"type": "ml_predict", "model": "m", "input": {"property": "relax"}}
    entries, unreadable, origins = read_source(tmp_path, template)
    assert origins == ["POSCAR", "a.json", "b.cif", "broken.json"]
    assert entries[0]["job"] == {"type": "ml_predict", "model": "m", "input": {"property": "relax", "structure": POSCAR}}
    assert entries[1]["job"]["input"]["structure"] == {"@class": "Structure"}
    assert entries[2]["job"]["input"]["structure"] == "data_x\n"
    assert list(unreadable) == [3] and "broken.json could not be read" in unreadable[3]
    assert template == {"type": "ml_predict", "model": "m", "input": {"property": "relax"}}


def test_a_missing_or_empty_source_says_so(tmp_path):
    with pytest.raises(SourceError, match="does not exist on the worker"):
        read_source(tmp_path / "nope.jsonl", DEFAULT_STRUCTURE_JOB)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SourceError, match="has no lines"):
        read_source(tmp_path / "empty.jsonl", DEFAULT_STRUCTURE_JOB)
    (tmp_path / "dir").mkdir()
    with pytest.raises(SourceError, match=r"has no structure files \(.cif"):
        read_source(tmp_path / "dir", DEFAULT_STRUCTURE_JOB)


def test_a_relative_source_is_under_kiln_home(tmp_path):
    assert resolve_source("batches/n.jsonl", tmp_path) == tmp_path / "batches" / "n.jsonl"
    assert resolve_source("/abs/n.jsonl", tmp_path) == Path("/abs/n.jsonl")


def test_the_input_names_a_source_and_by_default_predicts_energies():
    run = BatchRunInput.model_validate({"source": "x"})
    assert run.job.type == "ml_predict" and run.job.input == {"property": "energy"}
    with pytest.raises(ValueError, match="source"):
        BatchRunInput.model_validate({"source": ""})
