"""Where a persistent job serves: the address of its endpoint on its worker, and the token that endpoint asks for.

A running mcp_host job serves its MCP endpoint from its worker on a loopback port; the kiln API, which gives the
deployment its one public URL, forwards to it. The job writes its address under KILN_HOME/services (the home the
API and its workers share, as for files) rather than in an event: the token must never reach Prefect's event log.
Each entry is one file, written whole and renamed into place, readable by its owner only.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from kiln.settings import get_settings

TOKEN_HEADER = "x-kiln-service-token"


@dataclass(frozen=True)
class Service:
    """A persistent job's endpoint: its base URL on the worker, and the token every request to it carries."""

    job_id: str
    url: str
    token: str


def _folder() -> Path:
    return get_settings().home_dir / "services"


def _path(job_id: str) -> Path:
    if not job_id or "/" in job_id or job_id.startswith("."):
        raise ValueError(f"{job_id!r} is not a job id")
    return _folder() / f"{job_id}.json"


def register(job_id: str, url: str, token: str) -> Service:
    """Records where the job serves and the token its endpoint asks every request for."""
    service = Service(job_id, url, token)
    _folder().mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = _folder() / f".{job_id}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": service.url, "token": service.token}, out)
    os.replace(temporary, _path(job_id))
    return service


def lookup(job_id: str) -> Service | None:
    """Where the job serves, or None when it does not (not started yet, or ended)."""
    try:
        entry = json.loads(_path(job_id).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return Service(job_id, entry["url"], entry["token"])


def unregister(job_id: str) -> None:
    _path(job_id).unlink(missing_ok=True)
