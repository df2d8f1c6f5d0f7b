"""An MCP server packaged as an image: the Debian Python image of python_image.py with one more layer holding
tests/fixtures/mcp_stdio_server.py (the standard library alone: the image has no mcp SDK), which its Cmd runs.

Built in a moment from the cached Python layout: its blobs are linked, not copied, and the new layer is a few KB.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from kiln.tasks.plugin.images import ARCHITECTURES
from tests.sandbox.oci_layout import TAR, write_blob
from tests.sandbox.python_image import ENV, python_layout  # noqa: F401  a fixture

ROOT = Path(__file__).resolve().parents[2]
SERVER_SOURCE = ROOT / "tests" / "fixtures" / "mcp_stdio_server.py"
SERVER_PATH = "opt/kiln-test/mcp_stdio_server.py"
CMD = ["python3", f"/{SERVER_PATH}"]


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/")


def _layer_with(files: dict[str, bytes]) -> bytes:
    """An uncompressed layer tar of these files (and their folders), read-only to everyone but root."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders = sorted({str(Path(name).parents[i]) for name in files for i in range(len(Path(name).parents) - 1)})
        for folder in folders:
            info = tarfile.TarInfo(f"./{folder}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, time.time()
            tar.addfile(info)
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(content), 0o644, time.time()
            tar.addfile(info, io.BytesIO(content))
    return data.getvalue()


def layered(base: Path, target: Path, files: dict[str, bytes], cmd: list[str]) -> Path:
    """The OCI layout of `base`'s image with one more layer of `files`, its Cmd `cmd`, written to `target`."""
    (target / "blobs" / "sha256").mkdir(parents=True)
    index = json.loads((base / "index.json").read_text())
    manifest = json.loads(_blob(base, index["manifests"][0]["digest"]).read_text())
    config = json.loads(_blob(base, manifest["config"]["digest"]).read_text())
    for layer in manifest["layers"]:
        try:
            os.link(_blob(base, layer["digest"]), _blob(target, layer["digest"]))
        except OSError:  # another file system
            shutil.copyfile(_blob(base, layer["digest"]), _blob(target, layer["digest"]))
    tar = _layer_with(files)
    layer = write_blob(target, tar, TAR)
    config = {**config, "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()),
              "config": {**config["config"], "Cmd": cmd, "Env": ENV},
              "rootfs": {"type": "layers", "diff_ids": [*config["rootfs"]["diff_ids"],
                                                        f"sha256:{hashlib.sha256(tar).hexdigest()}"]}}  # fmt: skip
    config_ref = write_blob(target, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {**manifest, "config": config_ref, "layers": [*manifest["layers"], layer]}
    manifest_ref = write_blob(target, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_ref["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (target / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (target / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_ref]}))
    target.chmod(0o755)
    return target


@pytest.fixture(scope="session")
def mcp_layout(python_layout, tmp_path_factory) -> Path:  # noqa: F811
    """The MCP server image's OCI layout."""
    folder = tmp_path_factory.mktemp("mcp-image")
    folder.chmod(0o755)
    return layered(python_layout, folder / "layout", {SERVER_PATH: SERVER_SOURCE.read_bytes()}, CMD)
