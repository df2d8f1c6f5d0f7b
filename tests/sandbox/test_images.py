"""Images without a daemon: docker save archives and OCI layouts imported by manifest digest; bad files refused."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
import time

import pytest

from kiln.tasks.plugin import InvalidImage, import_image
from tests.sandbox.busybox_image import write_docker_archive, write_layout, write_layout_tarball


def test_the_busybox_image_is_built_in_under_a_second(base):
    started = time.monotonic()
    write_layout(base / "timed-layout")
    assert time.monotonic() - started < 1


def test_a_layout_its_tarball_and_a_docker_save_archive_import_and_unpack(base, tmp_path):
    layout = write_layout(base / "custom-layout", cmd=["echo", "hi"], env=["PATH=/bin", "MODE=test"])
    store = base / "custom-store"
    from_folder = import_image(layout, store)
    from_tarball = import_image(write_layout_tarball(layout, tmp_path / "oci.tar"), store)
    from_docker = import_image(write_docker_archive(layout, tmp_path / "docker.tar"), store)
    # the same manifest lands in the same place; docker's archive carries a manifest of its own
    assert from_folder == from_tarball and from_folder.digest.startswith("sha256:")
    assert from_docker.digest != from_folder.digest
    for image in (from_folder, from_docker):
        assert image.path == store / image.digest.replace(":", "-")
        assert (image.argv, image.env, image.working_dir) == (["echo", "hi"], ("PATH=/bin", "MODE=test"), "/")
        assert (image.rootfs / "bin" / "busybox").is_file() and (image.rootfs / "bin" / "sh").is_symlink()
    assert sorted(p.name for p in store.iterdir()) == sorted({from_folder.path.name, from_docker.path.name})


def test_an_image_already_in_the_store_is_not_unpacked_again(base, image):
    marker = image.rootfs / "etc" / "kiln-marker"
    marker.write_text("left by the first unpack")
    try:
        assert import_image(base / "layout", base / "store") == image
        assert marker.exists()
    finally:
        marker.unlink()


def test_a_corrupt_layer_is_refused_with_the_digest_that_did_not_match(base, tmp_path):
    archive = write_docker_archive(base / "layout", tmp_path / "docker.tar")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"x" * 64
    archive.write_bytes(bytes(data))
    expected = r"^image: docker.tar: skopeo could not read it: .*Digest did not match"
    with pytest.raises(InvalidImage, match=expected) as err:
        import_image(archive, tmp_path / "store")
    assert err.value.status_code == 400 and err.value.details[0]["loc"] == ["image"]
    assert list((tmp_path / "store").iterdir()) == []  # nothing half-imported stays


@pytest.mark.parametrize(
    "content, reason",
    [(b"not an image at all", "not a tar archive"), (None, "the archive is cut off"),
     (b"tar-of-other-files", "neither manifest.json (docker save) nor oci-layout")],
)  # fmt: skip
def test_a_file_that_is_not_an_image_is_refused_with_the_reason(base, tmp_path, content, reason):
    path = tmp_path / "upload.tar"
    if content is None:
        path.write_bytes(write_docker_archive(base / "layout", tmp_path / "whole.tar").read_bytes()[:100_000])
    elif content == b"tar-of-other-files":
        (tmp_path / "notes.txt").write_text("hello")
        with tarfile.open(path, "w") as tar:
            tar.add(tmp_path / "notes.txt", "notes.txt")
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidImage, match=re.escape(reason)):
        import_image(path, tmp_path / "store")


def test_an_image_for_another_platform_is_refused(base, tmp_path):
    layout = write_layout(tmp_path / "arm-layout")
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / index["manifests"][0]["digest"].replace(":", "/")
    config_path = layout / "blobs" / json.loads(manifest_path.read_text())["config"]["digest"].replace(":", "/")
    config = json.loads(config_path.read_text())
    config["architecture"] = "arm64"
    config_path.write_text(json.dumps(config))
    # re-digest the config and the manifest so only the platform is wrong
    def rewrite(path, data):
        digest = hashlib.sha256(data).hexdigest()
        path.unlink()
        (layout / "blobs" / "sha256" / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    manifest = json.loads(manifest_path.read_text())
    manifest["config"].update(rewrite(config_path, json.dumps(config).encode()))
    index["manifests"][0].update(rewrite(manifest_path, json.dumps(manifest).encode()))
    (layout / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidImage, match="built for linux/arm64; this worker runs linux/amd64 images"):
        import_image(layout, tmp_path / "store")


def test_a_folder_that_is_not_a_layout_is_refused(tmp_path):
    with pytest.raises(InvalidImage, match="a folder without an oci-layout file"):
        import_image(tmp_path, tmp_path / "store")
