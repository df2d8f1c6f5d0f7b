"""A fix to SQLAlchemy's aiosqlite adapter, for every SQLite database kiln runs: its job index and the embedded Prefect
server's.

SQLAlchemy's aiosqlite adapter (2.0) does not close the driver's cursor when its statement fails. The exception's
traceback keeps the cursor alive, often in a reference cycle, so it is freed later, by the garbage collector, on
whatever thread that runs: mostly the event loop's. Freeing an open sqlite3 cursor resets its statement, which takes its
connection's mutex; if that connection's own thread is meanwhile in SQLite's busy handler, waiting for the write lock
that a transaction of the event loop holds, the loop waits for the mutex and the transaction never ends: the whole
process stands still until the busy timeout runs out (60 s in Prefect). py-spy showed it in the Prefect server: the main
thread in `gc_collect_main → cursor_dealloc → sqlite3_reset → pthread_mutex_lock` for 60 s, a connection thread in
`sqlite3InvokeBusyHandler`; each stall ended in failed statements, and the next stall (three in four minutes under CI's
load). Here such a cursor is closed on its connection's thread, so the collector finds nothing to reset.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from sqlalchemy.dialects.sqlite import aiosqlite

# closes under way: a task the loop only holds weakly must be held here until it ends
_closing: set[asyncio.Task] = set()


def _close_on_its_thread(cursor: Any) -> None:
    """Queues the close behind the failed statement on the cursor's connection thread; awaits nothing, so it also
    serves a statement cancelled while its thread still runs it."""
    task = asyncio.ensure_future(cursor.close())
    _closing.add(task)
    task.add_done_callback(_closed)


def _closed(task: asyncio.Task) -> None:
    _closing.discard(task)
    if not task.cancelled():
        task.exception()  # a connection closed meanwhile took the cursor with it


def _execute(self: aiosqlite.AsyncAdapt_aiosqlite_cursor, operation: Any, parameters: Any = None) -> Any:
    """`AsyncAdapt_aiosqlite_cursor.execute` of SQLAlchemy 2.0.58, which also closes the cursor when it fails."""
    try:
        _cursor = self.await_(self._connection.cursor())
        try:
            if parameters is None:
                self.await_(_cursor.execute(operation))
            else:
                self.await_(_cursor.execute(operation, parameters))

            if _cursor.description:
                self.description = _cursor.description
                self.lastrowid = self.rowcount = -1

                if not self.server_side:
                    self._rows = deque(self.await_(_cursor.fetchall()))
            else:
                self.description = None
                self.lastrowid = _cursor.lastrowid
                self.rowcount = _cursor.rowcount
        except BaseException:
            _close_on_its_thread(_cursor)
            raise
        if not self.server_side:
            self.await_(_cursor.close())
        else:
            self._cursor = _cursor
    except Exception as error:
        self._adapt_connection._handle_exception(error)


def _executemany(self: aiosqlite.AsyncAdapt_aiosqlite_cursor, operation: Any, seq_of_parameters: Any) -> Any:
    """`AsyncAdapt_aiosqlite_cursor.executemany` of SQLAlchemy 2.0.58, which also closes the cursor when it fails."""
    try:
        _cursor = self.await_(self._connection.cursor())
        try:
            self.await_(_cursor.executemany(operation, seq_of_parameters))
        except BaseException:
            _close_on_its_thread(_cursor)
            raise
        self.description = None
        self.lastrowid = _cursor.lastrowid
        self.rowcount = _cursor.rowcount
        self.await_(_cursor.close())
    except Exception as error:
        self._adapt_connection._handle_exception(error)


def close_failed_cursors() -> None:
    """Puts the fixed `execute` and `executemany` in place of SQLAlchemy's; once per process is enough, more is harmless."""
    aiosqlite.AsyncAdapt_aiosqlite_cursor.execute = _execute
    aiosqlite.AsyncAdapt_aiosqlite_cursor.executemany = _executemany
