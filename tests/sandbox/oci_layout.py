"""OCI image layouts written by hand: blobs named by their digest, and the config, manifest and index of a one-layer
image tagged `latest` (the busybox and Python test images)."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

from kiln.tasks.plugin.images import ARCHITECTURES

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def write_blob(layout: Path, data: bytes, media_type: str) -> dict:
    """Stores `data` as a blob of the layout; its descriptor."""
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def finish_layout(layout: Path, layer: dict, diff_id: str, *, cmd: list[str], env: list[str]) -> Path:
    """Writes the config, manifest, index.json and oci-layout of an image whose one layer (descriptor `layer`, its
    uncompressed tar's digest `diff_id`) is already a blob of `layout`; index.json last, so a layout that has one
    is whole."""
    config = {
        "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()), "os": "linux",
        "config": {"Cmd": cmd, "Env": env, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }  # fmt: skip
    config_ref = write_blob(layout, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_ref, "layers": [layer]}  # fmt: skip
    manifest_ref = write_blob(layout, json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_ref["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_ref]}))
    return layout
