"""The `kiln` command against the session's stack, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def kiln(*args: str, key: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "KILN_API_KEY": key},
    )


def test_submit_watch_status_jobs_and_cancel(api_key, tmp_path):
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"seconds": 0.5}))
    submitted = kiln("submit", "sleep", "--input", f"@{spec}", "--priority", "3", key=api_key)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    watched = kiln("watch", job_id, key=api_key)
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout.strip().splitlines()[-1]) == {"slept_seconds": 0.5, "children": 0}
    status = json.loads(kiln("status", job_id, key=api_key).stdout)
    assert status["status"] == "completed" and status["priority"] == 3
    listing = kiln("jobs", "--limit", "50", key=api_key)
    assert job_id[:8] in listing.stdout
    late = kiln("cancel", job_id, key=api_key)
    assert late.returncode == 1 and "already completed" in late.stderr


def test_bad_input_is_refused_with_the_field_named(api_key):
    result = kiln("submit", "sleep", "--input", '{"seconds": "soon"}', key=api_key)
    assert result.returncode == 1
    assert "input.seconds" in result.stderr
    result = kiln("submit", "sleep", "--input", "{not json", key=api_key)
    assert result.returncode == 1 and "--input: not valid JSON" in result.stderr


def test_batch_submit_from_json_lines_and_its_live_status(tmp_path):
    import uuid

    from tests.integration.support import create_key

    key = create_key(f"cli-batch-{uuid.uuid4().hex[:8]}")  # a project of its own: its own batch rate limit
    lines = tmp_path / "jobs.jsonl"
    lines.write_text("\n".join([
        json.dumps({"type": "sleep", "input": {"seconds": 0.1}}),
        json.dumps({"type": "sleep", "input": {"seconds": -1}}),
        "",
        json.dumps({"job": {"type": "sleep", "input": {"seconds": 0.2}}, "refresh": True}),
    ]))  # fmt: skip
    submitted = kiln("batch", "submit", str(lines), key=key)
    assert submitted.returncode == 0, submitted.stderr
    assert "2 submitted, 0 cache hits, 1 failed" in submitted.stdout
    assert "job 2: jobs.1.job.input.seconds" in submitted.stderr
    batch_id = submitted.stdout.split()[1].rstrip(":")
    status = kiln("batch", "status", batch_id, key=key)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1] == "succeeded 2  failed 1"
