"""Files kiln holds (a project's uploads, the files a job produced) and the names they may have."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# what one path segment may take on the file systems kiln stores on (ext4, XFS: 255 bytes)
NAME_MAX_BYTES = 255
SHA256_PATTERN = r"^[0-9a-f]{64}$"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a file kiln holds, or None when it can.

    A name is one path segment: never empty, '.' or '..', without '/', '\\', NUL or another control
    character, without spaces at either end, at most 255 bytes of UTF-8. So no name can reach outside
    the folder it is looked up in, whatever joins it to a path.
    """
    if not name or not name.strip():
        return "a file name cannot be empty"
    if name in (".", ".."):
        return f"{name!r} is not a file name"
    if "/" in name or "\\" in name:
        return "a file name is one path segment, without '/' or '\\'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a file name cannot hold NUL or another control character"
    if name != name.strip():
        return "a file name cannot start or end with a space"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        return f"a file name is at most {NAME_MAX_BYTES} bytes of UTF-8"
    return None


def check_file_name(name: str) -> str:
    """`name`, or a ValueError saying why it cannot name a file (for pydantic fields)."""
    problem = name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


FileName = Annotated[str, AfterValidator(check_file_name)]


class StoredFile(BaseModel):
    """A file kiln holds: one the project uploaded, or one a job produced; its content is stored once, by sha256."""

    model_config = ConfigDict(extra="forbid")

    name: FileName = Field(description="The file's name: one path segment, as it was uploaded or stored.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="sha256 of the content, lower-case hex.")
    size: int = Field(ge=0, description="Size in bytes.")


# What a job input's field of uploads holds, one item per file: the name of a file uploaded with
# POST /api/v1/files, or its sha256. Submission pins each item to the upload it names, a StoredFile, so
# the job runs on (and its cache key covers) the content that was uploaded, even if the name is reused.
InputFile = str | StoredFile
