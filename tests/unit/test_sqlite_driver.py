"""kiln's fix to SQLAlchemy's aiosqlite adapter: a statement cancelled or failed leaves no open cursor behind for the
garbage collector to reset on the event loop's thread (which stalled Prefect's server for 60 s at a time)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3

import pytest
from sqlalchemy import text
from sqlalchemy.dialects.sqlite.aiosqlite import AsyncAdapt_aiosqlite_cursor
from sqlalchemy.ext.asyncio import create_async_engine

from kiln.store.sqlite_driver import close_failed_cursors

@pytest.fixture
def fixed_driver(monkeypatch):
    # monkeypatch puts SQLAlchemy's own methods back after the test
    monkeypatch.setattr(AsyncAdapt_aiosqlite_cursor, "execute", AsyncAdapt_aiosqlite_cursor.execute)
    monkeypatch.setattr(AsyncAdapt_aiosqlite_cursor, "executemany", AsyncAdapt_aiosqlite_cursor.executemany)
    close_failed_cursors()


def open_cursors(connection: sqlite3.Connection) -> list[sqlite3.Cursor]:
    """The driver's cursors of `connection` whose statement is still in use (a closed one refuses to fetch)."""
    found = []
    for cursor in [o for o in gc.get_objects() if isinstance(o, sqlite3.Cursor) and o.connection is connection]:
        try:
            cursor.fetchone()
        except sqlite3.ProgrammingError:
            continue
        found.append(cursor)
    return found


async def test_a_write_that_waited_out_the_busy_timeout_leaves_no_open_cursor(tmp_path, fixed_driver):
    """"database is locked": the failure behind Prefect's stalls, on a connection that goes on serving."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'fix.db'}", connect_args={"timeout": 0.2})
    try:
        async with engine.connect() as holder, engine.connect() as waiter:
            await holder.execute(text("CREATE TABLE t (x INTEGER)"))
            await holder.commit()
            await holder.execute(text("INSERT INTO t VALUES (1)"))  # the write lock, held until the commit
            driver = (await waiter.get_raw_connection()).driver_connection  # the aiosqlite connection
            with pytest.raises(Exception, match="database is locked"):
                await waiter.execute(text("INSERT INTO t VALUES (2)"))
            await waiter.rollback()
            await holder.commit()
            # the connection's thread runs what was queued on it in order: the close the fix queued comes first
            await asyncio.sleep(0.1)
            await (await driver.execute("SELECT 1")).close()
            assert open_cursors(driver._conn) == []
            await waiter.execute(text("INSERT INTO t VALUES (3)"))
            assert (await waiter.execute(text("SELECT count(*) FROM t"))).scalar() == 2  # it serves on
    finally:
        await engine.dispose()


async def test_a_statement_refused_by_the_database_leaves_no_open_cursor(tmp_path, fixed_driver):
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'fix.db'}")
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection  # the aiosqlite connection
            with pytest.raises(Exception, match="no such table"):
                await conn.execute(text("SELECT * FROM missing"))
            await asyncio.sleep(0.1)
            await (await driver.execute("SELECT 1")).close()
            assert open_cursors(driver._conn) == []
            assert (await conn.execute(text("SELECT 41 + 1"))).scalar() == 42  # the connection serves on
    finally:
        await engine.dispose()
