"""API keys: every endpoint but /healthz needs `Authorization: Bearer <key>`; a key belongs to one project."""

from __future__ import annotations

from fastapi import Request

from kiln.errors import Unauthorized
from kiln.store.store import hash_key


async def project_of_caller(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Authorization: send 'Bearer <api key>'; create a key with `kiln keys create --project NAME`")
    project_id = await request.app.state.store.project_for_key(key.strip())
    if project_id is None:
        raise Unauthorized("Authorization: the API key is unknown or revoked")
    request.state.key_hash = hash_key(key.strip())  # what rate limits count by
    return project_id
