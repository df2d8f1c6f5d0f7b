"""Job inputs too large to travel as Prefect flow-run parameters go by reference, through the results block.

Prefect serialises parameters in the creating process and stores them in its database; a
1000-structure input (2 MB of JSON) took minutes there and held the API's event loop. Above
INLINE_LIMIT the input is written to the `kiln-results` block that job outputs use, and the flow run
carries only its key; the kiln worker's executor reads it back before the flow starts.
"""

from __future__ import annotations

import json
from typing import Any

from kiln.prefect_env import RESULTS_BLOCK

INPUT_REFERENCE = "kiln_input"
INLINE_LIMIT = 64 * 1024


def _is_reference(parameters: dict[str, Any]) -> bool:
    return set(parameters) == {INPUT_REFERENCE}


async def flow_parameters(job_id: str, attempt: int, job_input: dict[str, Any]) -> dict[str, Any]:
    """The flow run's parameters: the input itself, or a reference to it when it is large."""
    text = json.dumps(job_input)
    if len(text) <= INLINE_LIMIT:
        return job_input
    from prefect.filesystems import LocalFileSystem

    key = f"inputs/{job_id}-{attempt}.json"
    block = await LocalFileSystem.aload(RESULTS_BLOCK)
    await block.awrite_path(key, text.encode())
    return {INPUT_REFERENCE: key}


def resolve_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The flow's real parameters, read back from the results block when the run carries a reference."""
    if not _is_reference(parameters):
        return parameters
    from prefect.filesystems import LocalFileSystem

    block = LocalFileSystem.load(RESULTS_BLOCK, _sync=True)
    return json.loads(block.read_path(parameters[INPUT_REFERENCE], _sync=True))


def passed_through(flow, parameters: dict[str, Any]):
    """The flow and parameters to hand Prefect's engine for an input read back from the results block.

    The engine walks every parameter value twice before a run starts (resolving futures, then block
    references and validation): 0.6 s for 1000 structures (bench/ml_predict.py). Such an input was
    validated against its job type's model when the API took it and holds plain JSON: it is read into
    that model here, once (with `read(value, checked=True)` where the model has one: it keeps the structures it
    parsed and does not check them again), and goes quoted (not walked) to a flow that does not validate it again.
    """
    from typing import get_type_hints

    from pydantic import BaseModel
    from prefect.utilities.annotations import quote

    hints = get_type_hints(flow.fn)
    values = {}
    for name, value in parameters.items():
        model = hints.get(name)
        if isinstance(model, type) and issubclass(model, BaseModel) and isinstance(value, dict):
            value = model.read(value, checked=True) if hasattr(model, "read") else model.model_validate(value)
        values[name] = quote(value)
    return flow.with_options(validate_parameters=False), values
