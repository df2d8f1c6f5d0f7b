"""Plugin endpoints: register one from an uploaded image (POST /api/v1/plugins) and list them (GET)."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import ValidationError

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.errors import Conflict, InputInvalid, InvalidRequest, ServerError, TooLarge, Unauthorized
from kiln.schemas.plugins import PluginSpec

router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))

CHUNK = 1 << 20


@router.get("/plugins", summary="The registered plugins (Prefect blocks), by name; environment values not shown")
async def list_plugins(project_id: Annotated[str, Depends(project_of_caller)]) -> list[dict]:
    from kiln.blocks.plugin import registered_plugins

    plugins = await registered_plugins()
    return [plugins[name].summary(name) for name in sorted(plugins)]


@router.post(
    "/plugins",
    status_code=201,
    summary="Register a plugin: its image imported into the store, then saved as a Prefect block",
    responses=error_responses(InvalidRequest, Conflict, TooLarge, InputInvalid),
)
async def register_plugin(
    request: Request,
    project_id: Annotated[str, Depends(project_of_caller)],
    image: Annotated[UploadFile, File(description="The image: a `docker save` archive or an OCI layout tarball.")],
    spec: Annotated[str, Form(
        description="The registration as JSON, a PluginSpec: {name, entrypoint, args, env, limits, input_schema, "
        "description, overwrite}; only name is required.",
        json_schema_extra={"contentMediaType": "application/json"},
    )],
) -> dict:
    """Refused with 400 naming `image` and why when the image is corrupt or of a kind kiln does not run, 409 when
    the name is taken (unless spec.overwrite; a plugin another project or an operator registered is never
    replaced), 413 past KILN_PLUGIN_IMAGE_MAX_MB."""
    from kiln.blocks.plugin import load_plugin
    from kiln.tasks.plugin.register import plugin_from_image

    settings = request.app.state.settings
    try:
        plugin_spec = PluginSpec.model_validate_json(spec)
    except ValidationError as exc:
        errors = [{"loc": ["spec", *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InputInvalid("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors),
                           details=errors) from None  # fmt: skip
    limit = settings.plugin_image_max_mb << 20
    if image.size is not None and image.size > limit:
        raise TooLarge(f"image: {image.size} bytes; an image may have at most {settings.plugin_image_max_mb} MB "
                       "(KILN_PLUGIN_IMAGE_MAX_MB)")  # fmt: skip
    existing = await load_plugin(plugin_spec.name)
    if existing is not None and not plugin_spec.overwrite:
        raise Conflict(f"name: a plugin called {plugin_spec.name!r} is registered; set spec.overwrite to replace it")
    if existing is not None and existing.project_id != project_id:
        raise Conflict(f"name: the plugin {plugin_spec.name!r} was registered by "
                       f"{'an operator' if existing.project_id is None else 'another project'}; only they can "
                       "replace it: choose another name")  # fmt: skip
    store = settings.plugin_images_dir
    store.mkdir(parents=True, exist_ok=True)
    upload_dir = Path(tempfile.mkdtemp(prefix=".upload-", dir=store))
    try:
        # named as uploaded, so an image's refusal names the file the caller sent
        path = upload_dir / (re.sub(r"[^\w.-]", "_", Path(image.filename or "image").name).lstrip(".") or "image")
        await _save_upload(image, path, limit, settings.plugin_image_max_mb)
        plugin = await asyncio.to_thread(plugin_from_image, path, plugin_spec, store, project_id)
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)
    try:
        await plugin.asave(plugin_spec.name, overwrite=plugin_spec.overwrite)
    except ValueError as exc:  # registered meanwhile
        raise Conflict(f"name: {plugin_spec.name!r}: {exc}; set spec.overwrite to replace it") from None
    return plugin.summary(plugin_spec.name)


async def _save_upload(image: UploadFile, path: Path, limit: int, limit_mb: int) -> None:
    """The upload (Starlette spools it to disk past 1 MB) copied to `path` chunk by chunk, refused past `limit`."""
    written = 0
    with path.open("wb") as out:
        while chunk := await image.read(CHUNK):
            written += len(chunk)
            if written > limit:
                raise TooLarge(f"image: more than {limit_mb} MB (KILN_PLUGIN_IMAGE_MAX_MB)")
            out.write(chunk)
