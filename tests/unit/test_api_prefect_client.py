"""The API serves a request's Prefect calls with its one Prefect client (kiln.api.app.SharedPrefectClient)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prefect.context import AsyncClientContext

from kiln.api.app import SharedPrefectClient


def test_a_request_runs_in_the_apis_prefect_client_context_once_the_lifespan_holds_one():
    api = FastAPI()
    seen = []

    @api.get("/context")
    async def context() -> dict:
        seen.append(AsyncClientContext.get())
        return {}

    api.add_middleware(SharedPrefectClient, api=api)
    shared = object()  # stands for the lifespan's entered AsyncClientContext
    with TestClient(api) as http:
        http.get("/context")
        api.state.prefect = shared
        http.get("/context")
        api.state.prefect = None  # the lifespan let it go
        http.get("/context")
    assert seen == [None, shared, None]
