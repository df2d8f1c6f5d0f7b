"""Fixtures of the unit tests (no servers)."""

from __future__ import annotations

import pytest

from kiln.store.store import Store


@pytest.fixture
async def store(tmp_path):
    """A job index of its own, migrated, on a real SQLite file."""
    s = Store(f"sqlite+aiosqlite:///{tmp_path / 'index.db'}")
    await s.migrate()
    yield s
    await s.close()
