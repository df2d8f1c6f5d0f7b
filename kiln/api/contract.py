"""The OpenAPI document as the API's contract: typed job requests, every error status with its one body, and 405s."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import ConfigDict, Field, TypeAdapter, create_model
from starlette.routing import compile_path

from kiln.errors import ErrorBody, InputInvalid, KilnError, RateLimited
from kiln.schemas.batches import BatchCreate, BatchEntry
from kiln.schemas.jobs import job_request_union

REF = "#/components/schemas/{model}"


def error_responses(*errors: type[KilnError]) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the kiln errors it raises: each status described by its classes' docstrings,
    all with the one ErrorBody."""
    table: dict[int | str, dict[str, Any]] = {}
    for cls in errors:
        entry = table.setdefault(cls.status_code, {"model": ErrorBody, "description": ""})
        entry["description"] = f"{entry['description']} {cls.__doc__}".strip()
        if cls is RateLimited:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds until the next request of this kind is taken.",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
    return table


def contract_openapi(app: FastAPI, job_types: Mapping[str, Any]):
    """The app's `openapi()`: FastAPI's document with the job requests typed from the registry `job_types`, and
    ErrorBody in place of FastAPI's HTTPValidationError; built once, on first request."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        job_request = job_request_union(job_types)
        bodies = {
            ("/api/v1/jobs", "post"): TypeAdapter(job_request).json_schema(ref_template=REF),
            ("/api/v1/jobs/submit-batch", "post"): _batch_request_schema(job_request),
        }
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for (path, method), schema in bodies.items():
            schemas.update(schema.pop("$defs", {}))
            if "title" in schema and schema.get("type") == "object":
                schemas[schema["title"]] = schema
                schema = {"$ref": REF.format(model=schema["title"])}
            content = document["paths"][path][method]["requestBody"]["content"]["application/json"]
            content["schema"] = schema
        # FastAPI adds its own 422 body to every route with parameters; kiln answers those with ErrorBody
        text = json.dumps(document).replace(REF.format(model="HTTPValidationError"), REF.format(model="ErrorBody"))
        document = json.loads(text)
        schemas = document["components"]["schemas"]
        for replaced in ("HTTPValidationError", "ValidationError", "BatchCreate"):
            schemas.pop(replaced, None)
        for operations in document["paths"].values():
            for operation in operations.values():
                invalid = operation.get("responses", {}).get("422")
                if invalid is not None and invalid.get("description") == "Validation Error":
                    invalid["description"] = InputInvalid.__doc__
        schemas.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template=REF))
        app.openapi_schema = document
        return document

    return openapi


def _batch_request_schema(job_request: Any) -> dict[str, Any]:
    entry = create_model("BatchEntryCreate", __base__=BatchEntry, job=(job_request, BatchEntry.model_fields["job"]))
    body = create_model(
        "BatchSubmit",
        __config__=ConfigDict(extra="forbid"),
        jobs=(
            list[entry | dict[str, Any]],
            Field(
                description="The jobs, each {job, compute_target, refresh}, at most 1000. An entry that does not "
                "match BatchEntryCreate is not refused with the batch: it fails alone, its index and field in "
                "its line of the answer."
            ),
        ),
        hardware=(BatchCreate.model_fields["hardware"].annotation, BatchCreate.model_fields["hardware"]),
    )
    return body.model_json_schema(ref_template=REF)


def one_value_per_query_parameter(request: Request) -> None:
    """Every query parameter of the API takes one value: a repeated one is refused, not silently cut to its last."""
    for name in set(request.query_params):
        values = request.query_params.getlist(name)
        if len(values) > 1:
            raise InputInvalid(f"{name}: given {len(values)} times; this query parameter takes one value",
                               details=[{"loc": ["query", name], "msg": "a single value is expected",
                                         "type": "single_value"}])  # fmt: skip


class AllowedMethods:
    """ASGI middleware: a method the path does not support is a 405 whose `Allow` lists every method of the path.

    Paths match as OpenAPI matches them, a concrete path before a templated one: GET /api/v1/jobs/submit-batch
    is a 405 (the path takes POST), not a GET of a job named 'submit-batch'. Starlette alone answers with
    the methods of the first route that matches the path, not of all of them.
    """

    def __init__(self, app, api: FastAPI):
        self.app = app
        self.api = api
        self._paths: list[tuple[re.Pattern, bool, frozenset[str]]] | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            allowed = self.allowed(scope["path"])
            if allowed and scope["method"] not in allowed:
                listed = ", ".join(sorted(allowed))
                body = ErrorBody(detail=f"{scope['method']} is not allowed on {scope['path']}; it takes {listed}")
                await send({"type": "http.response.start", "status": 405,
                            "headers": [(b"content-type", b"application/json"), (b"allow", listed.encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body.model_dump_json().encode()})
                return
        await self.app(scope, receive, send)

    def allowed(self, path: str) -> set[str]:
        """The methods of the routes that match `path`, the concrete ones first; empty when none does."""
        if self._paths is None:  # the routes are all in by the first request
            self._paths = [(compile_path(route.path)[0], "{" not in route.path, frozenset(route.methods))
                           for route in iter_route_contexts(self.api.routes) if route.methods]  # fmt: skip
        matching = [(concrete, methods) for regex, concrete, methods in self._paths if regex.match(path)]
        concrete = [methods for is_concrete, methods in matching if is_concrete]
        return set().union(*(concrete or [methods for _, methods in matching]))
