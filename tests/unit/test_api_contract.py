"""The OpenAPI document states what the API takes and answers: typed job requests, one error body, correct 405s."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from kiln.api.app import create_app
from kiln.registry import available_job_types
from kiln.schemas.jobs import job_request_union


@pytest.fixture(scope="module")
def app():
    return create_app()


@pytest.fixture(scope="module")
def document(app):
    return app.openapi()


def test_a_job_request_is_a_union_on_type_with_each_types_input(document):
    body = document["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "type"
    assert set(body["discriminator"]["mapping"]) == set(available_job_types())
    schemas = document["components"]["schemas"]
    sleep = schemas["SleepJobCreate"]
    assert sleep["properties"]["type"]["const"] == "sleep"
    assert sleep["properties"]["input"]["$ref"].endswith("/SleepInput")
    assert "input" in sleep["required"] and "seconds" in schemas["SleepInput"]["required"]
    # the `model` shorthand only where the input has a model
    assert "model" in schemas["MlPredictJobCreate"]["properties"] and "model" not in sleep["properties"]


def test_a_batch_entry_is_typed_but_any_object_is_taken_and_fails_alone(document):
    ref = document["paths"]["/api/v1/jobs/submit-batch"]["post"]["requestBody"]["content"]["application/json"]
    body = document["components"]["schemas"][ref["schema"]["$ref"].rsplit("/", 1)[1]]
    typed, anything = body["properties"]["jobs"]["items"]["anyOf"]
    assert typed["$ref"].endswith("/BatchEntryCreate") and anything["type"] == "object"


def test_a_type_registered_after_import_is_in_the_union():
    from kiln.schemas.sleep import SleepInput

    class Echo:
        name, description, input_model = "echo", "Echoes.", SleepInput

    union = job_request_union({**available_job_types(), "echo": Echo()})
    from pydantic import TypeAdapter

    assert "echo" in TypeAdapter(union).json_schema()["discriminator"]["mapping"]


def test_every_error_answer_is_documented_with_the_one_error_body(document):
    assert "HTTPValidationError" not in json.dumps(document)
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
            if path in ("/api/v1/hooks/labs/{lab}", "/api/v1/jobs/{job_id}/progress", "/api/v1/jobs/{job_id}/ended"):
                # a lab calls it with no kiln key: its Standard Webhooks signature is the authentication (401 without);
                # a running job's flow reports its progress, and its worker the run's end, with the run's token, not a
                # key (401 without)
                assert "401" in operation["responses"] and operation["security"] == [], (method, path)
            elif path != "/healthz":
                assert "401" in operation["responses"] and operation["security"], (method, path)
    too_many = document["paths"]["/api/v1/jobs"]["post"]["responses"]["429"]
    assert "Retry-After" in too_many["headers"]


@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("DELETE", "/api/v1/jobs/j1", "GET, PATCH"),
        ("OPTIONS", "/api/v1/batches", "DELETE, GET"),
        # a concrete path wins over a templated one, as in OpenAPI: not a GET of a job named 'submit-batch'
        ("GET", "/api/v1/jobs/submit-batch", "POST"),
    ],
)
def test_a_method_the_path_does_not_take_is_a_405_listing_all_it_takes(app, method, path, allow):
    response = TestClient(app).request(method, path)
    assert response.status_code == 405 and response.headers["allow"] == allow
    assert response.json() == {"detail": f"{method} is not allowed on {path}; it takes {allow}", "errors": []}


def test_an_unknown_route_is_a_404_with_the_error_body(app):
    response = TestClient(app).get("/api/v2/jobs")
    assert response.status_code == 404
    assert response.json()["detail"].startswith("no route GET /api/v2/jobs") and response.json()["errors"] == []


def test_a_missing_key_is_kilns_401_not_fastapis_403(app):
    response = TestClient(app).get("/api/v1/jobs")
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]


def test_a_repeated_query_parameter_is_refused_naming_it():
    from fastapi.testclient import TestClient

    from kiln.api.app import create_app

    # the dependency runs before any route (and before auth): no lifespan, no stack is needed to see it
    client = TestClient(create_app(), raise_server_exceptions=False)
    response = client.get("/healthz", params=[("limit", "1"), ("limit", "2")])
    assert response.status_code == 422
    assert response.json()["detail"] == "limit: given 2 times; this query parameter takes one value"


@pytest.mark.parametrize("body, accepted", [
    ({"priority": 3}, True), ({"priority": 3.0}, True),           # JSON Schema: 3.0 is an integer
    ({"priority": 3.5}, False), ({"priority": "3"}, False), ({"priority": True}, False),
])  # fmt: skip
def test_requests_take_json_types_as_json_schema_does(body, accepted):
    from pydantic import ValidationError

    from kiln.schemas import JobPatch

    try:
        assert JobPatch.model_validate(body).priority == 3 and accepted
    except ValidationError:
        assert not accepted
