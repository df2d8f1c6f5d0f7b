"""kiln.store.coordination's pure parts: the NOTIFY payloads and the asyncpg address of the job index."""

from __future__ import annotations

import uuid

from kiln.store.coordination import PAYLOAD_BYTES, asyncpg_dsn, is_shared, payloads


def test_a_write_of_many_jobs_is_announced_in_payloads_under_postgresqls_limit():
    job_ids = [str(uuid.uuid4()) for _ in range(1000)]
    announced = list(payloads("abc123", job_ids))
    assert len(announced) > 1
    assert all(len(p.encode()) < min(PAYLOAD_BYTES + 1, 8000) for p in announced)
    assert all(p.startswith("abc123 ") for p in announced)
    assert [i for p in announced for i in p.partition(" ")[2].split(",")] == job_ids


def test_one_job_is_one_payload():
    assert list(payloads("o", ["j1"])) == ["o j1"]
    assert list(payloads("o", [])) == []


def test_the_job_index_url_as_asyncpg_takes_it():
    assert asyncpg_dsn("postgresql+asyncpg://kiln:s%40cret@db:5432/index") == "postgresql://kiln:s%40cret@db:5432/index"
    assert is_shared("postgresql+asyncpg://kiln@db/index")
    assert not is_shared("sqlite+aiosqlite:///tmp/index.db")
