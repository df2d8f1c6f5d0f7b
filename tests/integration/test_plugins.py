"""Plugins registered through `kiln plugins` and POST /api/v1/plugins against the real stack, listed both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from tests.integration.support import JOB_TYPE_TESTS, SETTINGS
from tests.sandbox.busybox_image import write_docker_archive, write_layout, write_layout_tarball

pytestmark = JOB_TYPE_TESTS


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ))  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    layout = write_layout(folder / "layout", cmd=["/bin/echo", "hello"])
    return {"layout": layout, "docker": write_docker_archive(layout, folder / "busybox-docker.tar"),
            "oci": write_layout_tarball(layout, folder / "busybox-oci.tar")}  # fmt: skip


def name() -> str:
    return f"busybox-{uuid.uuid4().hex[:8]}"


def test_register_through_the_cli_list_both_ways_and_remove(stack, http, images, tmp_path):
    plugin = name()
    schema = tmp_path / "input.json"
    schema.write_text(json.dumps({"type": "object", "required": ["text"]}))
    added = kiln("plugins", "add", plugin, "--image", str(images["docker"]), "--env", "GREETING=hi",
                 "--memory-mb", "128", "--wall-seconds", "5", "--input-schema", str(schema),
                 "--description", "says hello")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert f"plugin {plugin!r} registered" in added.stdout and "runs /bin/echo hello" in added.stdout
    listed = kiln("plugins", "list")
    assert listed.returncode == 0 and plugin in listed.stdout and "memory_mb=128" in listed.stdout
    shown = {p["name"]: p for p in http.get("/api/v1/plugins").json()}[plugin]
    assert shown["entrypoint"] == ["/bin/echo"] and shown["args"] == ["hello"]  # the image's Cmd
    assert shown["env_names"] == ["GREETING"] and "hi" not in json.dumps(shown["env_names"])
    assert shown["limits"]["memory_mb"] == 128 and shown["limits"]["wall_seconds"] == 5
    assert shown["input_schema"] == {"type": "object", "required": ["text"]}
    assert shown["image_digest"].startswith("sha256:")
    assert shown["image_path"].startswith(str(SETTINGS.home_dir / "plugin-images"))
    again = kiln("plugins", "add", plugin, "--image", str(images["docker"]))
    assert again.returncode == 1 and "pass --overwrite" in again.stderr
    removed = kiln("plugins", "remove", plugin)
    assert removed.returncode == 0, removed.stderr
    assert plugin not in {p["name"] for p in http.get("/api/v1/plugins").json()}
    assert kiln("plugins", "remove", plugin).returncode == 1


def test_the_cli_refuses_a_corrupt_image_with_the_reason(stack, tmp_path):
    bad = tmp_path / "broken.tar"
    bad.write_bytes(b"\0" * 4096)
    refused = kiln("plugins", "add", name(), "--image", str(bad))
    assert refused.returncode == 1 and "image: broken.tar:" in refused.stderr


def upload(http, path, spec: dict):
    with open(path, "rb") as image:
        return http.post("/api/v1/plugins", files={"image": (path.name, image, "application/x-tar")},
                         data={"spec": json.dumps(spec)})  # fmt: skip


def test_register_through_the_api_then_409_then_overwrite(stack, http, images):
    plugin = name()
    created = upload(http, images["oci"], {"name": plugin, "entrypoint": ["/bin/sh", "-c"], "args": ["echo hi"],
                                           "limits": {"cpus": 0.5}, "description": "shell"})  # fmt: skip
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["name"] == plugin and body["entrypoint"] == ["/bin/sh", "-c"] and body["args"] == ["echo hi"]
    assert body["limits"]["cpus"] == 0.5 and body["limits"]["memory_mb"] == 512
    assert plugin in {p["name"] for p in http.get("/api/v1/plugins").json()}
    assert plugin in kiln("plugins", "list").stdout
    taken = upload(http, images["oci"], {"name": plugin})
    assert taken.status_code == 409 and "overwrite" in taken.json()["detail"]
    replaced = upload(http, images["oci"], {"name": plugin, "overwrite": True, "description": "again"})
    assert replaced.status_code == 201 and replaced.json()["description"] == "again"
    # the same image again is the same manifest: one folder in the store
    assert replaced.json()["image_path"] == body["image_path"]
    assert kiln("plugins", "remove", plugin).returncode == 0


def test_the_api_refuses_a_corrupt_image_naming_image_and_why(stack, http, images, tmp_path):
    cut = tmp_path / "cut.tar"
    cut.write_bytes(images["docker"].read_bytes()[:20_000])  # a cut-off docker save archive
    refused = upload(http, cut, {"name": name()})
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["detail"].startswith("image: cut.tar: ")
    assert body["errors"][0]["loc"] == ["image"] and body["errors"][0]["type"] == "invalid_image"


def test_the_api_refuses_a_bad_spec_naming_the_field(stack, http, images):
    bad_schema = upload(http, images["oci"], {"name": name(), "input_schema": {"type": "objekt"}})
    assert bad_schema.status_code == 422
    assert bad_schema.json()["detail"].startswith("spec.input_schema: Value error, not a valid JSON Schema at type")
    assert upload(http, images["oci"], {"name": "Not_A_Name"}).json()["errors"][0]["loc"] == ["spec", "name"]
    missing = http.post("/api/v1/plugins", data={"spec": json.dumps({"name": name()})})
    assert missing.status_code == 422 and "image" in missing.json()["detail"]


def test_only_the_project_that_registered_a_plugin_may_replace_it(stack, http, other_key, images):
    import httpx

    plugin = name()
    assert upload(http, images["oci"], {"name": plugin}).status_code == 201
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {other_key}"}, timeout=30) as other:
        taken = upload(other, images["oci"], {"name": plugin, "overwrite": True})
        assert taken.status_code == 409 and "registered by another project" in taken.json()["detail"]
        assert plugin in {p["name"] for p in other.get("/api/v1/plugins").json()}  # it runs their jobs too
    assert upload(http, images["oci"], {"name": plugin, "overwrite": True}).status_code == 201
    assert kiln("plugins", "remove", plugin).returncode == 0
