"""API keys: every endpoint but /healthz needs `Authorization: Bearer <key>`; a key belongs to one project."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kiln.errors import Unauthorized
from kiln.store.store import Caller, hash_key

# states the scheme in the OpenAPI document; a missing or malformed header is kiln's own 401, not FastAPI's 403
bearer = HTTPBearer(auto_error=False, description="An API key: `kiln keys create --project NAME` makes one.")


async def project_of_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    key = bearer_key(credentials)
    return admit(request, key, await request.app.state.store.caller(key))


def bearer_key(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The API key the request carries; Unauthorized when it carries none."""
    if credentials is None or not credentials.credentials.strip():
        raise Unauthorized("Authorization: send 'Bearer <api key>'; create a key with `kiln keys create --project NAME`")
    return credentials.credentials.strip()


def admit(request: Request, key: str, caller: Caller | None) -> str:
    """The caller's project, the caller noted on the request; Unauthorized for a key that has none."""
    if caller is None:
        raise Unauthorized("Authorization: the API key is unknown or revoked")
    request.state.key_hash = hash_key(key)  # what rate limits count by
    request.state.caller = caller
    return caller.project_id
