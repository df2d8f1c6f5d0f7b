"""Files kiln holds, under KILN_HOME/results/files: each content once by its sha256, named by a project or a job.

    files/
      content/ab/abcd…          every content once, read-only, its path its sha256
      projects/<project id>/
        uploads/<name>          {"name", "sha256", "size"}: the project's upload of that name (the last one)
        sha256/<sha256>         the name it was last uploaded under: uploads can be named by sha256 too
      jobs/<job id>/<name>      {"name", "sha256", "size"}: a file the job produced
      incoming/                 what is being written, renamed into place once whole

Why here: KILN_HOME/results is the one directory the API and the workers already share (the `kiln-results`
block's basepath), so what a worker stores the API can serve and what the API takes a worker can read. Why
not through the block's read_path/write_path: they move a whole file through memory as bytes, and a flow
needs a path (plugin_exec mounts its inputs into a sandbox) while the API streams downloads from one.

Every entry is a file of its own, written to a temporary name and renamed into place, so concurrent
uploads and jobs never lose one another's entries. Names are checked (kiln.schemas.files.name_problem)
before they join a path, and a content is looked up only by a sha256 read from an entry, so no name a
caller sends can reach outside these folders.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from kiln.errors import InputInvalid, InvalidRequest, ServerError
from kiln.schemas.files import InputFile, StoredFile, name_problem
from kiln.settings import KilnSettings, get_settings

CHUNK = 1024 * 1024
# the folder under KILN_HOME whose files POST /api/v1/files may upload by path
DATASETS_FOLDER = "datasets"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FileStore:
    """The files under one root: their contents, a project's uploads and a job's files."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def of(cls, settings: KilnSettings) -> FileStore:
        return cls(settings.files_dir)

    # contents

    def content_path(self, sha256: str) -> Path:
        """Where the content with this sha256 is (or would be) kept."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"{sha256!r} is not a sha256 in lower-case hex")
        return self.root / "content" / sha256[:2] / sha256

    def add_content(self, source: BinaryIO) -> tuple[str, int]:
        """Copies what `source` reads (from where it stands) into the store; its (sha256, size)."""
        temporary = self._incoming()
        digest, size = hashlib.sha256(), 0
        try:
            with temporary.open("wb") as out:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            final = self.content_path(digest.hexdigest())
            if final.exists():
                temporary.unlink()
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                temporary.chmod(0o444)  # a flow gets the path itself: it must not change what others read
                os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), size

    def add_content_of(self, path: Path) -> tuple[str, int]:
        with Path(path).open("rb") as source:
            return self.add_content(source)

    # a project's uploads

    def upload(self, project_id: str, name: str, source: BinaryIO) -> StoredFile:
        """Stores an upload of the project under `name`, replacing an earlier one of that name."""
        problem = name_problem(name)
        if problem:
            raise InputInvalid(f"name: {name!r}: {problem}")
        sha256, size = self.add_content(source)
        stored = StoredFile(name=name, sha256=sha256, size=size)
        project = self._project(project_id)
        self._write_entry(project / "uploads" / name, stored.model_dump_json())
        self._write_entry(project / "sha256" / sha256, name)
        return stored

    def uploads(self, project_id: str) -> list[StoredFile]:
        """The project's uploads, by name."""
        return _read_entries(self._project(project_id) / "uploads")

    def find_upload(self, project_id: str, ref: str) -> StoredFile | None:
        """The project's upload named `ref`, else the one whose sha256 is `ref`; None when neither is there."""
        project = self._project(project_id)
        if name_problem(ref) is None:
            found = _read_entry(project / "uploads" / ref)
            if found is not None:
                return found
        if _SHA256.fullmatch(ref):
            try:
                name = (project / "sha256" / ref).read_text()
            except FileNotFoundError:
                return None
            return StoredFile(name=name, sha256=ref, size=self.content_path(ref).stat().st_size)
        return None

    def pin_uploads(self, project_id: str, refs: Sequence[InputFile], field: str = "input.files") -> list[StoredFile]:
        """Each item of a job input's `field` as the project's upload it names (kiln.schemas.files.InputFile).

        A name or sha256 is looked up; a StoredFile (already pinned) is checked against the project's
        uploads by its sha256 and keeps its name. An item the project has no upload for is an
        InputInvalid naming `<field>.<index>`, all such items in one error.
        """
        pinned, problems = [], []
        for index, ref in enumerate(refs):
            key = ref.sha256 if isinstance(ref, StoredFile) else ref
            found = self.find_upload(project_id, key)
            if found is None:
                problems.append((index, key))
            else:
                pinned.append(found.model_copy(update={"name": ref.name}) if isinstance(ref, StoredFile) else found)
        if problems:
            raise InputInvalid(
                "; ".join(f"{field}.{index}: no upload named {ref!r} (nor with that sha256) in this project; "
                          "upload it with POST /api/v1/files (`kiln files put`); GET /api/v1/files lists them"
                          for index, ref in problems),
                details=[{"loc": [*field.split("."), index], "msg": "unknown file", "type": "unknown_file",
                          "input": ref} for index, ref in problems],
            )  # fmt: skip
        return pinned

    def upload_path_in_home(self, project_id: str, home: Path, path: str, max_bytes: int | None = None
                            ) -> list[StoredFile]:  # fmt: skip
        """Uploads a file, or every file of a folder (not its subfolders), under `home`/datasets, by its own name:
        data already on the machine the API runs on, copied into the store (content-addressed like any upload).
        `path` is relative to `home` (KILN_HOME) or absolute. Only KILN_HOME/datasets: the rest of KILN_HOME holds
        the databases and API keys. InputInvalid naming `path` when it is outside, missing, or names nothing to
        upload; OverflowError when its files together are larger than `max_bytes`."""
        home = Path(home).resolve()
        allowed = home / DATASETS_FOLDER
        candidate = Path(path)
        try:
            target = (candidate if candidate.is_absolute() else home / candidate).resolve()
            target.exists()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long
            raise InputInvalid(f"path: {path!r} is no path here ({exc})") from None
        if target != allowed and allowed not in target.parents:
            raise InputInvalid(f"path: {path!r} is not under {allowed}; only files put there can be uploaded by path "
                               "(the rest of KILN_HOME holds kiln's databases and keys): send others as multipart")  # fmt: skip
        if target.is_file():
            sources = [target]
        elif target.is_dir():
            # a link out of the folder is not followed
            sources = sorted(p for p in target.iterdir() if p.is_file() and not p.name.startswith(".")
                             and allowed in p.resolve().parents)  # fmt: skip
            if not sources:
                raise InputInvalid(f"path: the folder {path!r} holds no files")
        else:
            raise InputInvalid(f"path: no file or folder {path!r} under {allowed}")
        if max_bytes is not None and sum(source.stat().st_size for source in sources) > max_bytes:
            raise OverflowError(path)
        stored = []
        for source in sources:
            with source.open("rb") as handle:
                stored.append(self.upload(project_id, source.name, handle))
        return stored

    def pin_job_files(self, job_id: str, field: str) -> list[StoredFile]:
        """The files a job stored, as a job input pins uploads (kiln.schemas.files.StoredFile): the cache key covers
        their contents. InputInvalid naming `field` when the job stored none."""
        files = self.job_files(job_id)
        if not files:
            raise InputInvalid(f"{field}: job {job_id} has no files; GET /api/v1/jobs/{job_id}/files lists a job's files")
        return files

    def upload_path(self, file: StoredFile | str) -> Path:
        """The local path of an upload's content, given as the StoredFile a job's input was pinned to or its sha256."""
        sha256 = file.sha256 if isinstance(file, StoredFile) else file
        path = self.content_path(sha256)
        if not path.exists():
            raise ServerError(f"the content {sha256} is not in {self.root / 'content'}: is KILN_HOME/results shared "
                              "between the kiln API and this worker?")  # fmt: skip
        return path

    # a job's files

    def store_job_files(self, job_id: str, files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]
                        ) -> list[StoredFile]:  # fmt: skip
        """Stores files a job produced, each under its own name (or the key it has in a mapping); a file already
        stored under that name for the job is replaced. Returns them as stored."""
        job = self._job(job_id)
        named = files.items() if isinstance(files, Mapping) else ((Path(path).name, path) for path in files)
        plan: dict[str, Path] = {}
        for name, path in named:
            problem = name_problem(name)
            if problem:
                raise InvalidRequest(f"job file {name!r}: {problem}")
            if name in plan:
                raise InvalidRequest(f"job file {name!r}: named twice ({plan[name]} and {path})")
            if not Path(path).is_file():
                raise InvalidRequest(f"job file {name!r}: {path} is not a file")
            plan[name] = Path(path)
        stored = []
        for name, path in plan.items():
            sha256, size = self.add_content_of(path)
            entry = StoredFile(name=name, sha256=sha256, size=size)
            self._write_entry(job / name, entry.model_dump_json())
            stored.append(entry)
        return stored

    def job_files(self, job_id: str) -> list[StoredFile]:
        """The files the job stored, by name; none when it stored none."""
        return _read_entries(self._job(job_id))

    def job_file(self, job_id: str, name: str) -> tuple[StoredFile, Path] | None:
        """The job's file `name` and the path of its content; None when the job stored no file of that name."""
        if name_problem(name) is not None:
            return None
        found = _read_entry(self._job(job_id) / name)
        return None if found is None else (found, self.content_path(found.sha256))

    def _incoming(self) -> Path:
        """A new temporary path on the store's file system, so that renaming it into place is atomic."""
        folder = self.root / "incoming"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex

    def _write_entry(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._incoming()
        temporary.write_text(text)
        os.replace(temporary, path)

    def _project(self, project_id: str) -> Path:
        return self.root / "projects" / _segment(project_id, "project id")

    def _job(self, job_id: str) -> Path:
        return self.root / "jobs" / _segment(job_id, "job id")


def _segment(value: str, what: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(f"{what} {value!r}: {problem}")
    return value


def _read_entry(path: Path) -> StoredFile | None:
    try:
        return StoredFile.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def _read_entries(folder: Path) -> list[StoredFile]:
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except FileNotFoundError:
        return []
    entries = (_read_entry(folder / name) for name in names)
    return [entry for entry in entries if entry is not None]


# for flows and tasks: the store of this process's KILN_HOME


def store_job_files(job_id: str, files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]
                    ) -> list[StoredFile]:  # fmt: skip
    """Stores files the job `job_id` produced (kiln.runtime.current_job() gives a flow its job id), so that
    GET /api/v1/jobs/{id}/files lists them; see FileStore.store_job_files."""
    return FileStore.of(get_settings()).store_job_files(job_id, files)


def upload_path(file: StoredFile | str) -> Path:
    """The local path of an upload a job's input names (pinned at submission to a StoredFile); read it, do not
    change it."""
    return FileStore.of(get_settings()).upload_path(file)

