"""Files against the real stack: uploads, a job input naming them, a job's files downloaded (HTTP, SDK, CLI)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from kiln.sdk import AsyncClient, Client
from tests.integration.support import HOME, SETTINGS, create_key, wait_final

LIMIT = SETTINGS.upload_max_bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def key(stack) -> str:
    # a project of its own: its uploads are only these tests', and cache hits are on, as by default
    return create_key(f"files-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def files_http(key):
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as h:
        yield h


def upload(http: httpx.Client, *files: tuple[str, bytes]) -> httpx.Response:
    return http.post("/api/v1/files", files=[("files", (name, content)) for name, content in files])


def raw_upload(http: httpx.Client, *files: tuple[str, bytes]) -> httpx.Response:
    """An upload with each filename sent byte for byte (httpx would escape NUL and backslashes, as browsers do)."""
    boundary = "kilnboundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()
                    + content + b"\r\n" for name, content in files) + f"--{boundary}--\r\n".encode()  # fmt: skip
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return http.post("/api/v1/files", content=body, headers=headers)


@pytest.fixture(scope="module")
def echo_job(files_http) -> dict:
    """A finished echo job that read an upload and stored a file of its own, echo.txt: 'hi hi hello'."""
    assert upload(files_http, ("greeting.txt", b"hello")).status_code == 201
    job = files_http.post("/api/v1/jobs", json={"type": "echo", "input": {
        "message": "hi", "times": 2, "files": ["greeting.txt"], "save_as": "echo.txt"}}).json()  # fmt: skip
    # the input names the upload pinned to its content
    assert job["input"]["files"] == [{"name": "greeting.txt", "sha256": sha(b"hello"), "size": 5}]
    done = wait_final(files_http, job["id"])
    assert done["status"] == "completed", done["status_reason"]
    return done


def test_uploads_are_stored_by_sha256_listed_and_replaced_by_name(files_http, other_key):
    response = upload(files_http, ("POSCAR", b"Si\n1.0\n"), ("data.csv", b"a,b\n1,2\n"))
    assert response.status_code == 201, response.text
    assert response.json() == [{"name": "POSCAR", "sha256": sha(b"Si\n1.0\n"), "size": 7},
                               {"name": "data.csv", "sha256": sha(b"a,b\n1,2\n"), "size": 8}]  # fmt: skip
    assert upload(files_http, ("data.csv", b"a,b\n3,4\n5,6\n")).status_code == 201
    listed = {f["name"]: f for f in files_http.get("/api/v1/files").json()}
    assert listed["data.csv"] == {"name": "data.csv", "sha256": sha(b"a,b\n3,4\n5,6\n"), "size": 12}
    content = Path(HOME) / "results" / "files" / "content" / listed["POSCAR"]["sha256"][:2] / listed["POSCAR"]["sha256"]
    assert content.read_bytes() == b"Si\n1.0\n"
    other = httpx.get(f"{SETTINGS.api_url}/api/v1/files", headers={"Authorization": f"Bearer {other_key}"})
    assert "POSCAR" not in {f["name"] for f in other.json()}


def test_an_upload_above_the_limit_is_a_413_naming_it_whether_its_length_is_declared_or_not(files_http):
    big = b"x" * (LIMIT + 1)
    declared = upload(files_http, ("big.bin", big))
    assert declared.status_code == 413
    detail = declared.json()["detail"]
    assert f"at most {LIMIT} bytes (4 MiB, KILN_UPLOAD_MAX_BYTES)" in detail, detail

    # chunked, no Content-Length: refused as the bytes arrive
    boundary = "kilnboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.bin"\r\n\r\n'.encode()

    def body():
        yield head
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]
        yield f"\r\n--{boundary}--\r\n".encode()

    chunked = files_http.post("/api/v1/files", content=body(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    assert chunked.status_code == 413 and "KILN_UPLOAD_MAX_BYTES" in chunked.json()["detail"]
    assert "big.bin" not in {f["name"] for f in files_http.get("/api/v1/files").json()}


@pytest.mark.parametrize("name", ["../escape.txt", "/etc/passwd", "a/b", "nul\x00.txt", "..", "\\..\\x"])
def test_an_upload_whose_name_could_leave_its_folder_is_refused_naming_the_part(files_http, name):
    response = raw_upload(files_http, ("fine.txt", b"ok"), (name, b"evil"))
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("files.1: filename ")
    assert response.json()["errors"][0]["loc"] == ["body", "files", 1]
    # nothing of the request was stored, and nothing landed beside the store
    assert "fine.txt" not in {f["name"] for f in files_http.get("/api/v1/files").json()}
    assert not list(Path(HOME).rglob("escape.txt")) and not list(Path(HOME).rglob("evil"))


def test_an_upload_that_is_not_files_is_refused_saying_what_to_send(files_http):
    # JSON is the path form ({"path"}); anything else in JSON says what to send, both ways
    as_json = files_http.post("/api/v1/files", json={"files": ["a"]})
    detail = as_json.json()["detail"]
    assert as_json.status_code == 422 and detail.startswith("path: ") and "multipart/form-data" in detail, detail
    text_field = files_http.post("/api/v1/files", files=[("files", (None, b"not a file"))])
    assert text_field.status_code == 422 and text_field.json()["detail"].startswith("files.0: a file is expected")
    nothing = files_http.post("/api/v1/files", files=[("other", ("a.txt", b"x"))])
    assert nothing.status_code == 422 and "other: an upload has only 'files' parts" in nothing.json()["detail"]
    # parts are stored in order: a name sent twice ends naming its last part
    twice = upload(files_http, ("same.txt", b"1"), ("same.txt", b"2"))
    assert twice.status_code == 201 and [f["size"] for f in twice.json()] == [1, 1]
    assert {f["name"]: f for f in files_http.get("/api/v1/files").json()}["same.txt"]["sha256"] == sha(b"2")


def test_a_job_input_naming_an_unknown_upload_is_a_422_naming_the_item(files_http):
    upload(files_http, ("known.txt", b"known"))
    response = files_http.post("/api/v1/jobs", json={"type": "echo", "input": {
        "message": "hi", "files": ["known.txt", "unknown.txt", "../../etc/passwd"]}})  # fmt: skip
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail.startswith("input.files.1: no upload named 'unknown.txt'") and "input.files.2" in detail
    assert [e["loc"] for e in response.json()["errors"]] == [["input", "files", 1], ["input", "files", 2]]
    bad_output = files_http.post("/api/v1/jobs", json={"type": "echo", "input": {"message": "hi", "save_as": "../x"}})
    assert bad_output.status_code == 422 and bad_output.json()["detail"].startswith("input.save_as:")


def test_a_job_reads_its_uploads_and_its_file_is_listed_and_downloaded(files_http, other_key, echo_job):
    job = done = echo_job
    said = b"hi hi hello"
    assert done["output"]["echo"] == said.decode()
    stored = {"name": "echo.txt", "sha256": sha(said), "size": len(said)}
    assert done["output"]["saved"] == [stored]
    assert files_http.get(f"/api/v1/jobs/{job['id']}/files").json() == [stored]

    download = files_http.get(f"/api/v1/jobs/{job['id']}/files/echo.txt")
    assert download.status_code == 200 and download.content == said
    assert download.headers["content-type"].startswith("text/plain")
    assert download.headers["content-disposition"] == 'attachment; filename="echo.txt"'
    assert download.headers["etag"] == f'"{sha(said)}"'

    missing = files_http.get(f"/api/v1/jobs/{job['id']}/files/nope.txt")
    assert missing.status_code == 404 and missing.json()["detail"].startswith(f"job {job['id']} has no file 'nope.txt'")
    no_job = files_http.get("/api/v1/jobs/no-such-job/files")
    assert no_job.status_code == 404 and no_job.json()["detail"] == "job no-such-job not found"
    # another project's key sees no such job, not its files
    other = httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {other_key}"})
    for path in (f"/api/v1/jobs/{job['id']}/files", f"/api/v1/jobs/{job['id']}/files/echo.txt"):
        refused = other.get(path)
        assert refused.status_code == 404 and refused.json()["detail"] == f"job {job['id']} not found"


@pytest.mark.parametrize("name", ["..", ".", "%2E%2E", "..%2Fecho.txt", "%2E%2E%2F%2E%2E%2F%2E%2E%2Fkiln.db",
                                  "%2Fetc%2Fpasswd", "echo.txt%00", "..%5C..%5Ckiln.db", "greeting.txt"])  # fmt: skip
def test_a_download_name_that_could_leave_the_jobs_files_finds_nothing(files_http, echo_job, name):
    # the request target exactly as written: httpx would resolve '..' itself before sending
    target = f"/api/v1/jobs/{echo_job['id']}/files/{name}"
    response = files_http.get(target, extensions={"target": target.encode()})
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/json" and set(response.json()) == {"detail", "errors"}


def test_a_cache_hit_has_the_files_of_the_job_whose_result_it_reused(files_http, echo_job):
    hit = files_http.post("/api/v1/jobs", json={"type": "echo", "input": echo_job["input"]}).json()
    assert hit["status"] == "cache_hit"
    assert files_http.get(f"/api/v1/jobs/{hit['id']}/files").json() == echo_job["output"]["saved"]
    assert files_http.get(f"/api/v1/jobs/{hit['id']}/files/echo.txt").content == b"hi hi hello"


def test_the_cache_key_covers_an_uploads_content_not_only_its_name(files_http):
    marker = uuid.uuid4().hex
    upload(files_http, ("cached.txt", b"first " + marker.encode()))
    request = {"type": "echo", "input": {"message": "say", "files": ["cached.txt"]}}
    first = wait_final(files_http, files_http.post("/api/v1/jobs", json=request).json()["id"])
    assert first["output"]["echo"] == f"say first {marker}"
    assert files_http.post("/api/v1/jobs", json=request).json()["status"] == "cache_hit"
    # by sha256 is the same input as by name
    by_sha = {"type": "echo", "input": {"message": "say", "files": [sha(f"first {marker}".encode())]}}
    assert files_http.post("/api/v1/jobs", json=by_sha).json()["status"] == "cache_hit"
    upload(files_http, ("cached.txt", b"second " + marker.encode()))
    second = files_http.post("/api/v1/jobs", json=request).json()
    assert second["status"] == "pending"
    assert wait_final(files_http, second["id"])["output"]["echo"] == f"say second {marker}"


def test_the_sdk_uploads_lists_and_downloads(key, tmp_path):
    source = tmp_path / "structure.cif"
    source.write_text("data_Si")
    with Client(SETTINGS.api_url, key) as client:
        assert client.files.upload(source).sha256 == sha(b"data_Si")
        assert client.files.upload(b"inline", name="inline.txt").size == 6
        assert {"structure.cif", "inline.txt"} <= {f.name for f in client.files.list()}
        job = client.jobs.create(type="echo", message="sdk", files=["inline.txt", "structure.cif"], save_as="out.txt",
                                 refresh=True).wait(timeout=120)  # fmt: skip
        assert job.status.value == "completed", job.status_reason
        assert [f.name for f in job.files()] == [f.name for f in client.jobs.files(job.id)] == ["out.txt"]
        assert job.download("out.txt", tmp_path).read_text() == "sdk inline data_Si"
        assert client.jobs.download(job.id, "out.txt", tmp_path / "copy.txt").read_text() == "sdk inline data_Si"
        from kiln.errors import NotFound

        with pytest.raises(NotFound, match="has no file 'gone.txt'"):
            job.download("gone.txt", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "out.txt", "structure.cif"]


async def test_the_async_sdk_uploads_and_downloads(key, tmp_path):
    async with AsyncClient(SETTINGS.api_url, key) as client:
        stored = await client.files.upload(b"async bytes", name="async.txt")
        assert stored.name in {f.name for f in await client.files.list()}
        job = await client.jobs.create(type="echo", message="a", files=[stored.sha256], save_as="a.txt", refresh=True)
        await job.wait(timeout=120)
        assert [f.name for f in await job.files()] == ["a.txt"]
        assert (await job.download("a.txt", tmp_path)).read_text() == "a async bytes"


def kiln(*args: str, key: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KILN_API_KEY": key}, cwd=cwd)  # fmt: skip


def test_the_cli_puts_lists_and_gets_files(key, files_http, tmp_path):
    (tmp_path / "one.txt").write_text("1")
    (tmp_path / "two.txt").write_text("22")
    put = kiln("files", "put", str(tmp_path / "one.txt"), str(tmp_path / "two.txt"), key=key)
    assert put.returncode == 0, put.stderr
    assert put.stdout.splitlines() == [f"one.txt\t{sha(b'1')}\t1", f"two.txt\t{sha(b'22')}\t2"]
    assert f"two.txt\t{sha(b'22')}\t2" in kiln("files", "list", key=key).stdout.splitlines()

    job = files_http.post("/api/v1/jobs", json={"type": "echo", "input": {
        "message": "cli", "files": ["one.txt", "two.txt"], "save_as": "said.txt"}}).json()  # fmt: skip
    assert wait_final(files_http, job["id"])["status"] == "completed"
    everything = kiln("files", "get", job["id"], "-o", str(tmp_path / "all"), key=key)
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.split() == [str(tmp_path / "all" / "said.txt")]
    assert (tmp_path / "all" / "said.txt").read_text() == "cli 1 22"
    one = kiln("files", "get", job["id"], "said.txt", key=key, cwd=tmp_path)
    assert one.returncode == 0 and (tmp_path / "said.txt").read_text() == "cli 1 22"
    missing = kiln("files", "get", job["id"], "nope.txt", key=key)
    assert missing.returncode == 1 and "has no file 'nope.txt'" in missing.stderr
    absent = kiln("files", "put", str(tmp_path / "absent.txt"), key=key)
    assert absent.returncode != 0 and "absent.txt" in absent.stderr
