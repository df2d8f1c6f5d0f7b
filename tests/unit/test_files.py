"""The file store (kiln.files): names that cannot escape, contents stored once, uploads pinned, job files."""

from __future__ import annotations

import hashlib
import io

import pytest
from pydantic import TypeAdapter, ValidationError

from kiln.errors import InputInvalid, InvalidRequest
from kiln.files import FileStore
from kiln.schemas.files import FileName, StoredFile, name_problem

PROJECT = "0b6f1a4e-2c1d-4a57-9d0e-5d7d0c1f2a3b"
OTHER = "7d0e5d7d-0c1f-4a3b-9b6f-1a4e2c1d4a57"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path):
    return FileStore(tmp_path / "files")


@pytest.mark.parametrize("name", ["data.csv", "POSCAR", ".env", "a b.txt", "résumé.pdf", "x" * 255, "..hidden", "a..b"])
def test_a_name_is_any_one_path_segment(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("name, problem", [
    ("", "empty"), ("   ", "empty"), (".", "not a file name"), ("..", "not a file name"),
    ("../etc/passwd", "one path segment"), ("/etc/passwd", "one path segment"), ("a/b", "one path segment"),
    ("..\\secret", "one path segment"), ("a\x00b", "NUL"), ("a\nb", "control"), ("a\x7f", "control"),
    (" lead", "space"), ("trail ", "space"), ("x" * 256, "255 bytes"), ("é" * 128, "255 bytes"),
])  # fmt: skip
def test_a_name_that_could_leave_its_folder_is_refused_saying_why(name, problem):
    assert problem in name_problem(name)
    with pytest.raises(ValidationError, match=problem.split()[0]):
        TypeAdapter(FileName).validate_python(name)


def test_a_content_is_stored_once_by_its_sha256_and_read_only(store):
    first = store.add_content(io.BytesIO(b"hello"))
    again = store.add_content(io.BytesIO(b"hello"))
    assert first == again == (sha(b"hello"), 5)
    path = store.content_path(sha(b"hello"))
    assert path.read_bytes() == b"hello" and path.stat().st_mode & 0o222 == 0
    assert list((store.root / "incoming").iterdir()) == []
    with pytest.raises(ValueError, match="not a sha256"):
        store.content_path("../../etc/passwd")


def test_uploads_are_per_project_and_a_name_uploaded_again_names_the_new_content(store):
    store.upload(PROJECT, "b.txt", io.BytesIO(b"bee"))
    assert store.upload(PROJECT, "a.txt", io.BytesIO(b"one")) == StoredFile(name="a.txt", sha256=sha(b"one"), size=3)
    store.upload(PROJECT, "a.txt", io.BytesIO(b"two!"))
    assert [(f.name, f.size) for f in store.uploads(PROJECT)] == [("a.txt", 4), ("b.txt", 3)]
    assert store.uploads(OTHER) == [] and store.find_upload(OTHER, "a.txt") is None
    # the first content stays: a job pinned to it still runs on it
    assert store.content_path(sha(b"one")).read_bytes() == b"one"
    with pytest.raises(InputInvalid, match="one path segment"):
        store.upload(PROJECT, "../x", io.BytesIO(b""))


def test_an_upload_is_found_by_name_or_sha256_in_its_project_only(store):
    stored = store.upload(PROJECT, "POSCAR", io.BytesIO(b"Si"))
    assert store.find_upload(PROJECT, "POSCAR") == stored
    assert store.find_upload(PROJECT, stored.sha256) == stored
    assert store.find_upload(OTHER, stored.sha256) is None
    for ref in ("../POSCAR", "/etc/passwd", "POSCAR\x00", "", "nope"):
        assert store.find_upload(PROJECT, ref) is None


def test_pinning_turns_names_into_contents_and_names_every_unknown_item(store):
    poscar = store.upload(PROJECT, "POSCAR", io.BytesIO(b"Si"))
    data = store.upload(PROJECT, "data.csv", io.BytesIO(b"1,2"))
    renamed = StoredFile(name="INCAR", sha256=data.sha256, size=0)
    assert store.pin_uploads(PROJECT, ["POSCAR", data.sha256, renamed]) == [
        poscar, data, StoredFile(name="INCAR", sha256=data.sha256, size=3)]  # fmt: skip
    with pytest.raises(InputInvalid) as refused:
        store.pin_uploads(PROJECT, ["POSCAR", "missing.txt", "../../etc/passwd"], "input.files")
    assert refused.value.message.startswith("input.files.1: no upload named 'missing.txt'")
    assert "input.files.2: no upload named '../../etc/passwd'" in refused.value.message
    assert [e["loc"] for e in refused.value.details] == [["input", "files", 1], ["input", "files", 2]]
    with pytest.raises(InputInvalid, match="input.files.0"):
        store.pin_uploads(OTHER, [poscar])


def test_a_jobs_files_are_stored_listed_and_found_by_name_only(store, tmp_path):
    (tmp_path / "out.txt").write_text("result")
    (tmp_path / "log").write_text("ran")
    assert [f.name for f in store.store_job_files("job-1", [tmp_path / "out.txt", str(tmp_path / "log")])] == [
        "out.txt", "log"]  # fmt: skip
    store.store_job_files("job-1", {"renamed.txt": tmp_path / "log"})
    assert [f.name for f in store.job_files("job-1")] == ["log", "out.txt", "renamed.txt"]
    found, path = store.job_file("job-1", "out.txt")
    assert found.sha256 == sha(b"result") and path.read_text() == "result"
    assert store.job_files("job-2") == [] and store.job_file("job-2", "out.txt") is None
    for name in ("../job-1/out.txt", "..", "/etc/passwd", "out.txt\x00"):
        assert store.job_file("job-1", name) is None


@pytest.mark.parametrize("files, problem", [
    ({"../escape": "x"}, "one path segment"), ({"/abs": "x"}, "one path segment"), ({"a\x00": "x"}, "NUL"),
    ({"ok": "missing"}, "is not a file"),
])  # fmt: skip
def test_a_job_file_name_that_could_escape_is_refused(store, tmp_path, files, problem):
    (tmp_path / "x").write_text("x")
    with pytest.raises(InvalidRequest, match=problem):
        store.store_job_files("job-1", {name: tmp_path / path for name, path in files.items()})
    assert store.job_files("job-1") == []
    with pytest.raises(ValueError, match="job id"):
        store.job_files("../job-1")


def test_a_job_type_names_an_input_field_of_uploads_that_its_input_has():
    from kiln.schemas.job_types import JobType
    from kiln.schemas.sleep import SleepInput

    with pytest.raises(ValueError, match="input_files names 'files', which is no field of SleepInput"):
        JobType(name="t", description="", input_model=SleepInput, flow=None, input_files="files")


def test_a_path_is_uploaded_only_from_kiln_home_datasets(store, tmp_path):
    home = tmp_path / "home"
    (home / "datasets" / "cifs").mkdir(parents=True)
    (home / "api-key").write_text("secret")
    (home / "datasets" / "cifs" / "a.cif").write_text("data_a")
    (home / "datasets" / "cifs" / "b.cif").write_text("data_b")
    (home / "datasets" / "cifs" / "key").symlink_to(home / "api-key")
    uploaded = store.upload_path_in_home(PROJECT, home, "datasets/cifs")
    assert [f.name for f in uploaded] == ["a.cif", "b.cif"]  # the link out of the folder is not followed
    assert store.upload_path_in_home(PROJECT, home, str(home / "datasets" / "cifs" / "a.cif"))[0].sha256 == sha(b"data_a")
    for elsewhere in ("api-key", ".", "datasets/../api-key", "/etc/passwd", "datasets/cifs/key"):
        with pytest.raises(InputInvalid, match="is not under"):
            store.upload_path_in_home(PROJECT, home, elsewhere)
    with pytest.raises(OverflowError):
        store.upload_path_in_home(PROJECT, home, "datasets/cifs", max_bytes=11)
    for nonsense in ("datasets/a\x00b", "datasets/" + "x" * 5000):
        with pytest.raises(InputInvalid, match="is no path here"):
            store.upload_path_in_home(PROJECT, home, nonsense)


def test_dotted_input_fields_reach_into_nested_models():
    from kiln.flows.dataset_process import JOB_TYPE
    from kiln.schemas.dataset_process import DatasetProcessInput
    from kiln.schemas.job_types import JobType, input_field, with_input_field

    job_input = DatasetProcessInput.model_validate({"source": {"file": "a.cif"}})
    assert input_field(job_input, "source.files") == ["a.cif"] and input_field(job_input, "source.job") is None
    pinned = StoredFile(name="a.cif", sha256=sha(b"x"), size=1)
    assert with_input_field(job_input, "source.files", [pinned]).source.files == [pinned]
    assert (JOB_TYPE.input_files, JOB_TYPE.input_job) == ("source.files", "source.job")
    with pytest.raises(ValueError, match="input_job names 'source.nope'"):
        JobType(name="t", description="", input_model=DatasetProcessInput, flow=None, input_files="source.files",
                input_job="source.nope")  # fmt: skip
