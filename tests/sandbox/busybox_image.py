"""A busybox OCI image written by hand (busybox-static and its applet links in one layer), in well under a second."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

from tests.sandbox.oci_layout import TAR, finish_layout, write_blob

BUSYBOX = Path("/bin/busybox")


def _rootfs_layer() -> bytes:
    buffer = io.BytesIO()
    applets = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "out", "in", "proc", "dev", "sys"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX), "bin/busybox")
        for applet in applets:
            if applet != "bin/busybox":
                info = tarfile.TarInfo(applet)
                info.type, info.linkname = tarfile.SYMTYPE, "/bin/busybox"
                tar.addfile(info)
        for name, text in {"etc/passwd": "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
                           "etc/shadow": "root:image-shadow:1::::::\n"}.items():  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text), 0o644
            tar.addfile(info, io.BytesIO(text.encode()))
    return buffer.getvalue()


def write_layout(layout: Path, *, cmd: list[str] | None = None, env: list[str] | None = None) -> Path:
    """An OCI image layout of busybox at `layout`, tagged `latest`, with this Cmd and Env in its config."""
    shutil.rmtree(layout, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    layer = write_blob(layout, _rootfs_layer(), TAR)
    return finish_layout(layout, layer, layer["digest"], cmd=cmd or ["sh"],
                         env=env or ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])  # fmt: skip


def write_docker_archive(layout: Path, archive: Path) -> Path:
    """The image of an OCI layout as `docker save` writes it, converted by skopeo."""
    archive.unlink(missing_ok=True)
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout}:latest",
                    f"docker-archive:{archive}:kiln/busybox:latest"], check=True, capture_output=True)  # fmt: skip
    return archive


def write_layout_tarball(layout: Path, tarball: Path) -> Path:
    """The OCI layout packed into one tar, as `skopeo copy … oci-archive:` or a registry export gives it."""
    with tarfile.open(tarball, "w") as tar:
        for path in sorted(layout.rglob("*")):
            tar.add(str(path), str(path.relative_to(layout)), recursive=False)
    return tarball
