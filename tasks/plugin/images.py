"""Plugin images without a daemon: a `docker save` archive or an OCI layout (a directory or its tarball), imported
into a store by its manifest digest and unpacked once into the root filesystem both sandbox tiers run."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import InvalidRequest, ServerError

TAG = "kiln"
# where the sandboxes mount over a read-only root; they must exist in it beforehand
MOUNT_POINTS = ("proc", "dev", "sys", "tmp", "in", "out")
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}


class InvalidImage(InvalidRequest):
    """An image file that is corrupt or of a kind kiln does not run; the message says which and why."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"image: {path.name}: {why}",
                         details=[{"loc": ["image"], "msg": why, "type": "invalid_image"}])  # fmt: skip


@dataclass(frozen=True)
class ImageRef:
    """An imported image: its manifest digest, its folder in the store, and what its config says to run."""

    digest: str  # "sha256:…" of the image manifest
    path: Path  # <store>/sha256-<hex>: the OCI layout in oci/, the unpacked root filesystem in bundle/rootfs
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = "/"

    @property
    def rootfs(self) -> Path:
        return self.path / "bundle" / "rootfs"

    @property
    def argv(self) -> list[str]:
        """What the image runs when no command is given: Entrypoint then Cmd, as Docker does."""
        return [*self.entrypoint, *self.cmd]


def import_image(path: Path, store_dir: Path) -> ImageRef:
    """Copies the image at `path` into `store_dir` and unpacks it, unless an image of that manifest is there already.

    Raises InvalidImage with the reason when the file is corrupt (a layer whose digest does not match, a cut-off
    archive), not an image, or built for another platform."""
    path, store_dir = Path(path), Path(store_dir)
    source = _source(path)
    store_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=store_dir))
    try:
        # skopeo checks every blob against its digest on the way in
        _tool(path, "skopeo could not read it", "skopeo", "--insecure-policy", "copy", "-q", source,
              f"oci:{staging}/oci:{TAG}")  # fmt: skip
        digest = _manifest_digest(staging / "oci")
        image = _from_layout(path, digest, store_dir / digest.replace(":", "-"), staging / "oci")
        if not (image.path / "bundle").is_dir():
            rootless = ["--rootless"] if os.geteuid() != 0 else []
            _tool(path, "umoci could not unpack it", "umoci", "unpack", *rootless, "--image", f"{staging}/oci:{TAG}",
                  str(staging / "bundle"))  # fmt: skip
            for folder in MOUNT_POINTS:
                (staging / "bundle" / "rootfs" / folder).mkdir(mode=0o755, exist_ok=True)
            # runc gives a tmpfs the mode of the folder it covers; /tmp is for uid 65534 to write
            (staging / "bundle" / "rootfs" / "tmp").chmod(0o1777)
            # an unprivileged (Tier B) worker reads a root filesystem a root import wrote
            for folder in (staging, staging / "bundle"):
                folder.chmod(0o755)
            shutil.rmtree(image.path, ignore_errors=True)
            try:
                staging.rename(image.path)
            except OSError:  # another import of the same image finished first
                if not (image.path / "bundle").is_dir():
                    raise
        return image
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_image(folder: Path) -> ImageRef:
    """The image imported into `folder` (a store's sha256-… folder, as a Plugin block names it), read from its
    layout; ServerError when it is not there, as when the API and this worker do not share KILN_HOME."""
    folder = Path(folder)
    layout = folder / "oci"
    if not (folder / "bundle" / "rootfs").is_dir() or not (layout / "index.json").is_file():
        raise ServerError(f"the plugin image {folder} is not on this worker: is KILN_HOME shared between the kiln "
                          "API and its workers?")  # fmt: skip
    return _from_layout(folder, _manifest_digest(layout), folder, layout)


def image_size(folder: Path) -> int | None:
    """The bytes of an imported image as a registry counts them: its config and layers as its manifest lists them
    (the layers compressed, when they are); None when the image is not in this process's store."""
    layout = Path(folder) / "oci"
    try:
        manifest = _blob(layout, _manifest_digest(layout))
        return manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _source(path: Path) -> str:
    """The skopeo transport that reads this file or folder."""
    if path.is_dir():
        if not (path / "oci-layout").is_file():
            raise InvalidImage(path, "a folder without an oci-layout file is not an OCI image layout")
        return f"oci:{path}"
    if not path.is_file():
        raise InvalidImage(path, "no such file")
    try:
        with tarfile.open(path) as archive:
            names = {name.removeprefix("./") for name in archive.getnames()}
    except (tarfile.TarError, EOFError, OSError) as error:
        cut_off = "unexpected end of data" in str(error)
        why = "the archive is cut off (unexpected end of data)" if cut_off else \
            "not a tar archive (docker save, OCI layout tarball) nor an OCI layout folder"  # fmt: skip
        raise InvalidImage(path, why) from None
    if "oci-layout" in names:
        return f"oci-archive:{path}"
    if "manifest.json" in names:
        return f"docker-archive:{path}"
    raise InvalidImage(path, "a tar archive with neither manifest.json (docker save) nor oci-layout (OCI layout)")


def _tool(path: Path, what: str, *argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        message = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", lines[-1])
        raise InvalidImage(path, f"{what}: {message}")


def _manifest_digest(layout: Path) -> str:
    (manifest,) = json.loads((layout / "index.json").read_text())["manifests"]
    return manifest["digest"]


def _blob(layout: Path, digest: str) -> dict:
    return json.loads((layout / "blobs" / digest.replace(":", "/")).read_text())


def _from_layout(path: Path, digest: str, folder: Path, layout: Path) -> ImageRef:
    """The ImageRef of a layout's image, read from its config; refused when it is not for this machine."""
    manifest = _blob(layout, digest)
    config = _blob(layout, manifest["config"]["digest"])
    here = ARCHITECTURES.get(platform.machine(), platform.machine())
    built_for = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if built_for != f"linux/{here}":
        raise InvalidImage(path, f"built for {built_for}; this worker runs linux/{here} images")
    run = config.get("config") or {}
    return ImageRef(digest=digest, path=folder, entrypoint=tuple(run.get("Entrypoint") or ()),
                    cmd=tuple(run.get("Cmd") or ()), env=tuple(run.get("Env") or ()),
                    working_dir=run.get("WorkingDir") or "/")  # fmt: skip
