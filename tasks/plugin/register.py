"""A plugin's registration: its image imported into the store, then the Plugin block that names it (not yet saved)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from kiln.blocks.plugin import Plugin
from kiln.errors import InvalidRequest
from kiln.schemas.plugins import PluginSpec
from kiln.tasks.plugin.images import import_image


def plugin_from_image(image: Path, spec: PluginSpec, store_dir: Path, project_id: str | None = None) -> Plugin:
    """The Plugin block of `spec` running the image at `image`, imported into `store_dir` (once per manifest).

    The entrypoint and args default to the image's Entrypoint and Cmd, as Docker's do: an entrypoint given
    drops the image's Cmd. Raises InvalidImage (400) when the image is corrupt or unsupported, InvalidRequest
    when neither spec nor image names a program to run."""
    ref = import_image(image, store_dir)
    if spec.entrypoint is not None:
        entrypoint, args = spec.entrypoint, spec.args or []
    elif spec.args is not None:
        entrypoint, args = list(ref.entrypoint), spec.args
    else:
        entrypoint, args = list(ref.entrypoint), list(ref.cmd)
    if not entrypoint:  # an image with only a Cmd: its first word is the program
        entrypoint, args = args[:1], args[1:]
    try:
        return Plugin(image_digest=ref.digest, image_path=str(ref.path), entrypoint=entrypoint, args=args,
                      env=spec.env, limits=spec.limits, input_schema=spec.input_schema,
                      tier=spec.tier, description=spec.description, project_id=project_id)  # fmt: skip
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(map(str, error["loc"]))
        raise InvalidRequest(f"{field}: {error['msg'].removeprefix('Value error, ')}",
                             details=[{"loc": list(error["loc"]), "msg": error["msg"],
                                       "type": error["type"]}]) from None  # fmt: skip
