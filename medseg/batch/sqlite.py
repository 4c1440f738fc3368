"""The SQLite conventions of ``OUT/manifest.sqlite``, shared by the batch manifest and the PACS tables.

One autocommit connection per process, shared by its threads under one lock; every change is one
``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (the write lock is taken up front, so two processes
never interleave a read-modify-write); ``synchronous=FULL``; the journal mode (WAL by default) is
chosen by whoever creates the file.  Used by :class:`medseg.batch.manifest.Manifest` and
:class:`medseg.pacs.state.PacsState`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["connect", "create_schema", "immediate_transaction"]


def connect(
    path: Path, *, busy_timeout_s: float, journal_mode: str | None = None, foreign_keys: bool = False
) -> sqlite3.Connection:
    """Open (creating its folder) an autocommit connection usable from several threads.

    Args:
        path: The database file.
        busy_timeout_s: How long a statement waits for another connection's lock.
        journal_mode: ``"WAL"`` or ``"DELETE"`` to set the journal mode; ``None`` keeps the file's.
        foreign_keys: Enforce foreign keys.

    Returns:
        The connection, with ``sqlite3.Row`` rows and ``synchronous=FULL``; callers serialise its
        use with a lock (see :func:`immediate_transaction`).

    Raises:
        sqlite3.DatabaseError: The file is not a database or cannot be opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    db.row_factory = sqlite3.Row
    db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    if journal_mode is not None:
        db.execute(f"PRAGMA journal_mode = {journal_mode}")
    db.execute("PRAGMA synchronous = FULL")
    if foreign_keys:
        db.execute("PRAGMA foreign_keys = ON")
    return db


@contextlib.contextmanager
def immediate_transaction(
    db: sqlite3.Connection, lock: contextlib.AbstractContextManager[Any]
) -> Iterator[sqlite3.Connection]:
    """One write transaction holding the database's write lock from the start (``BEGIN IMMEDIATE``).

    Commits when the block succeeds, rolls back on any exception (re-raised); ``lock`` serialises
    the threads sharing ``db``.
    """
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def create_schema(db: sqlite3.Connection, schema: str, *, meta_table: str, version: str) -> str:
    """Run ``schema`` (``CREATE ... IF NOT EXISTS`` statements) and read or record the schema version.

    Call it inside :func:`immediate_transaction`, so that a caller refusing the returned version
    rolls the creation back.

    Args:
        db: The connection.
        schema: ``;``-separated statements.
        meta_table: Key/value table (``key``, ``value``) holding the ``schema`` version.
        version: The version recorded in a new database.

    Returns:
        The version stored in the database (``version`` for a new one).
    """
    for statement in schema.split(";"):
        if statement.strip():
            db.execute(statement)
    row = db.execute(f"SELECT value FROM {meta_table} WHERE key = 'schema'").fetchone()
    if row is None:
        db.execute(f"INSERT INTO {meta_table} (key, value) VALUES ('schema', ?)", (version,))
        return version
    return str(row[0])
