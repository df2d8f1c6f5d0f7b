"""A running job's progress on kiln's own path: from its flow straight to the kiln API, not through Prefect's events.

Prefect's event pipeline can lag minutes behind its flow-run states (after a burst of a thousand runs), and a progress
event that reaches kiln after the job's end is dropped so that the end stays last. A report the flow posts to the kiln
API is in the job index before the flow can end.

The kiln worker gives each flow run it starts a run token: the job id, the flow run id and their HMAC-SHA256 under the
run key. It lets that run report on its own job and on the job's children, and only while that flow run is the job's
current attempt. The run key is KILN_RUN_KEY, else KILN_HOME/run-key, which the first kiln process that needs it writes
(`kiln up` gives its API and worker one KILN_HOME).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from kiln.errors import Unauthorized
from kiln.settings import KilnSettings

RUN_TOKEN_HEADER = "X-Kiln-Run-Token"


class RunTokenRefused(Unauthorized):
    """No run token, or one that is not the token of this job's current flow run (or of its parent's)."""

    def __init__(self, message: str):
        super().__init__(message, details={"loc": ["header", RUN_TOKEN_HEADER], "msg": message,
                                           "type": "run_token"})  # fmt: skip


def run_key(settings: KilnSettings) -> bytes:
    """The key run tokens are signed with: KILN_RUN_KEY, else KILN_HOME/run-key (written now if it is not there)."""
    if settings.run_key is not None:
        return settings.run_key.get_secret_value().encode()
    path = settings.home_dir / "run-key"
    if not path.exists():
        _write_once(path, secrets.token_hex(32))
    return path.read_text().strip().encode()


def _write_once(path: Path, text: str) -> None:
    """Writes `path` whole, readable by its owner only, unless another process wrote it first (then keeps theirs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    draft.write_text(text)
    draft.chmod(0o600)
    try:
        os.link(draft, path)  # atomic: no reader sees a file half written
    except FileExistsError:
        pass
    finally:
        draft.unlink()


def _signature(key: bytes, job_id: str, flow_run_id: str) -> str:
    return hmac.new(key, f"{job_id}.{flow_run_id}".encode(), hashlib.sha256).hexdigest()


def run_token(key: bytes, job_id: str, flow_run_id: str) -> str:
    """The token of the flow run `flow_run_id` of job `job_id`."""
    return f"{job_id}.{flow_run_id}.{_signature(key, job_id, flow_run_id)}"


def read_run_token(key: bytes, token: str | None) -> tuple[str, str]:
    """(job id, flow run id) of a token signed with `key`; RunTokenRefused, saying why, otherwise."""
    if not token:
        raise RunTokenRefused(f"{RUN_TOKEN_HEADER}: missing; a job's flow reports with the token its worker gave it")
    job_id, _, rest = token.partition(".")
    flow_run_id, _, signature = rest.partition(".")
    if not (job_id and flow_run_id and signature) or not hmac.compare_digest(
        signature, _signature(key, job_id, flow_run_id)
    ):
        raise RunTokenRefused(f"{RUN_TOKEN_HEADER}: not a run token of this kiln")
    return job_id, flow_run_id
