"""The OpenAPI document is the contract: schemathesis, with all its checks, over every operation of the real stack."""

from __future__ import annotations

import os
import uuid

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig

from tests.integration.support import REQUEST_TIMEOUT, SETTINGS, create_key, wait_until

# A fixed seed and example count keep CI stable; about two minutes per database on the 2-core machine.
CONFIG = """
seed = 20260

# the key as the Bearer scheme the document declares: never a negative case's mutated header
[auth.openapi.HTTPBearer]
bearer = "${KILN_CONTRACT_KEY}"

[generation]
max-examples = 20
deterministic = true

# A job request valid by the schema may still be refused with a 400 or a 422 for what JSON Schema cannot
# say: a structure that does not parse as a crystal, a model or cluster not installed here, a parent job
# that does not exist, `structure` or `structures` but not both. The message names the field.
[[operations]]
include-path = "/api/v1/jobs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "422", "429"]

# A container job valid by the schema names an image (a registered plugin) the generator cannot know: 404 naming
# `image`; or asks for what the sandbox cannot honour (a port, another type than docker): 400 naming the field;
# or an environment variable name no process can have: 422.
[[operations]]
include-path = "/api/v1/compute/jobs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "422", "429"]

# A plugin's image is bytes the schema cannot describe (a generated one is no image: 400 naming `image`), and
# its spec is JSON inside a form field (a generated string is no PluginSpec: 422 naming `spec`).
[[operations]]
include-path = "/api/v1/plugins"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "409", "413", "422"]

# A lab's registration valid by the schema may be refused for what it cannot say: a signing secret that is no
# whsec_… secret, a URL or resource list the block refuses (422 naming the field), a name taken (409).
[[operations]]
include-path = "/api/v1/labs"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "409", "422"]

# A generated lab name is no registered lab (404 naming it); its slots may be refused by the lab (400) or the lab
# may not answer (502).
[[operations]]
include-path-regex = "^/api/v1/labs/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "502"]

# A lab's callback: a generated one is unsigned (401) or for no registered lab (404).
[[operations]]
include-path-regex = "^/api/v1/hooks/labs/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "413", "422"]

# A running job's progress report: a generated run token is none of this kiln's (401), a generated job id no job
# (404), a token of a job's earlier attempt 409.
[[operations]]
include-path-regex = "^/api/v1/jobs/[^/]+/progress$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409"]

# A worker's word that a job's run ended: a generated run token is none of this kiln's (401), a generated job id no
# job (404).
[[operations]]
include-path-regex = "^/api/v1/jobs/[^/]+/ended$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404"]

# Approving a generated job id: 404; a job of the key's project that waits for no approval: 409.
[[operations]]
include-path-regex = "^/api/v1/jobs/[^/]+/(approve|reject)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409"]
"""


@pytest.fixture(scope="module")
def contract_key(stack):
    return create_key(f"contract-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def contract(contract_key):
    os.environ["KILN_CONTRACT_KEY"] = contract_key
    schema = schemathesis.openapi.from_url(
        f"{SETTINGS.api_url}/openapi.json", config=SchemathesisConfig.from_str(CONFIG)
    )
    yield schema
    # what the run submitted (sleeps of up to a day among them) must not hold the worker slot for later tests
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {contract_key}"},
                      timeout=REQUEST_TIMEOUT) as http:

        def unfinished() -> list[dict]:
            return [job for status in ("pending", "queued", "running")
                    for job in http.get("/api/v1/jobs", params={"status": status, "limit": 1000}).json()["jobs"]]  # fmt: skip

        def all_cancelled() -> bool:
            # again each round: a batch of over 1000 jobs is listed a page at a time, and a batch_run job's children
            # may come after its parent's cancel
            left = unfinished()
            for job in left:
                http.post(f"/api/v1/jobs/{job['id']}/cancel")
            return not left

        try:
            wait_until(all_cancelled, timeout=300, interval=2, what="the contract run's jobs to be cancelled")
        except AssertionError as timed_out:
            left = [(job["id"], job["type"], job["status"], job["status_reason"]) for job in unfinished()]
            raise AssertionError(f"{timed_out}; still unfinished: {left[:20]} ({len(left)} in all)") from None


schema = schemathesis.pytest.from_fixture("contract")


@schema.parametrize()
def test_every_operation_keeps_the_openapi_contract(case, contract_key):
    case.call_and_validate(timeout=REQUEST_TIMEOUT)
