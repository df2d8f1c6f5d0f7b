"""GET /api/v1/models: the ML models this installation can run."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.errors import ServerError, Unauthorized

router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))


@router.get("/models", summary="The ML models, what they predict, in which units, and where they come from")
async def list_models(request: Request, project_id: Annotated[str, Depends(project_of_caller)]) -> list[dict]:
    from kiln.tasks.ml.models import available_models

    return [model.as_dict() for model in available_models(request.app.state.settings.models_path)]
