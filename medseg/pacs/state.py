"""What medseg knows about remote series and stored results: tables beside the batch manifest.

The segmentation state of every series lives in the batch manifest
(:class:`medseg.batch.manifest.Manifest`, ``OUT/manifest.sqlite``).  The PACS layer adds its
own tables **to the same database file**, with the same conventions (autocommit connection,
every change one ``BEGIN IMMEDIATE`` transaction, the journal mode the batch run chose (WAL by
default), ``synchronous=FULL``):

* ``pacs_series`` - one row per remote or received series: where it came from, the query-time
  decision and reason, the transfer state (``pending``, ``receiving``, ``retrieved``,
  ``failed``, ``gone``, ``skipped``), attempts, error, instance counts, the local input folder;
* ``pacs_stored`` - one row per result object (SEG, RTSTRUCT) per destination with its
  SOPInstanceUID and state (``stored``, ``failed``): a result is sent again only while it is
  not recorded as stored, and before sending it the destination is asked whether it already
  has that SOPInstanceUID (so a run killed between the upload and the record does not store
  it twice);
* ``pacs_events`` - an append-only log (``queried``, ``retrieved``, ``retrieve_failed``,
  ``gone``, ``received``, ``complete``, ``stored``, ``store_failed``, ...).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from medseg.batch.sqlite import connect, create_schema, immediate_transaction
from medseg.errors import MedsegError
from medseg.types import PathLike

__all__ = ["TRANSFER_STATES", "PacsState"]

TRANSFER_STATES = ("pending", "receiving", "retrieved", "failed", "gone", "skipped")
SCHEMA_VERSION = "1"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS pacs_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pacs_series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL DEFAULT '',
    origin TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    remote_instances INTEGER,
    local_instances INTEGER,
    decision TEXT NOT NULL CHECK (decision IN ('selected', 'skipped')),
    reason TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in TRANSFER_STATES)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    input_dir TEXT,
    error TEXT,
    first_seen REAL,
    last_seen REAL,
    last_received REAL,
    retrieved_at REAL,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS pacs_series_state ON pacs_series (state);
CREATE TABLE IF NOT EXISTS pacs_stored (
    key TEXT NOT NULL,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    file TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('stored', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    stored_at REAL,
    updated_at REAL,
    PRIMARY KEY (key, destination, kind, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS pacs_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS pacs_events_series ON pacs_events (series_uid, event);
"""


class PacsState:
    """The PACS tables of ``OUT/manifest.sqlite`` (thread-safe: one connection, one lock).

    Args:
        path: The database file (the batch manifest's).
        busy_timeout_s: How long to wait for another connection's write lock.
    """

    def __init__(self, path: PathLike, *, busy_timeout_s: float = 120.0) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        try:
            journal_mode = None  # an existing file keeps the mode the batch run chose
            if not self.path.exists():  # the batch manifest's default
                mode = os.environ.get("MEDSEG_BATCH_JOURNAL", "WAL").upper()
                journal_mode = "DELETE" if mode == "DELETE" else "WAL"
            self._db = connect(self.path, busy_timeout_s=busy_timeout_s, journal_mode=journal_mode)
            with self._tx() as db:
                found = create_schema(db, _SCHEMA, meta_table="pacs_meta", version=SCHEMA_VERSION)
                if found != SCHEMA_VERSION:
                    raise MedsegError(f"{self.path}: PACS state schema {found} is not supported")
        except sqlite3.DatabaseError as exc:
            raise MedsegError(f"{self.path}: cannot open the PACS state ({exc})") from exc

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> PacsState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db, self._lock)

    @staticmethod
    def _event(db: sqlite3.Connection, series_uid: str, event: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO pacs_events (series_uid, event, at, detail) VALUES (?, ?, ?, ?)",
            (series_uid, event, time.time(), detail),
        )

    # ------------------------------------------------------------ series
    def record_query(
        self,
        *,
        series_uid: str,
        study_uid: str,
        origin: str,
        modality: str,
        description: str,
        series_number: int | None,
        remote_instances: int | None,
        selected: bool,
        reason: str,
    ) -> dict[str, Any]:
        """Insert or refresh a series seen in a query; returns the row after the update.

        A new selected series is ``pending``, a new non-selected one ``skipped``.  A known
        series keeps its transfer state unless the decision changed (``skipped`` <-> ``pending``)
        or it was ``gone`` and is listed again (``pending``).
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM pacs_series WHERE series_uid = ?", (series_uid,)).fetchone()
            decision = "selected" if selected else "skipped"
            if row is None:
                state = "pending" if selected else "skipped"
                db.execute(
                    "INSERT INTO pacs_series (series_uid, study_uid, origin, modality, description, series_number,"
                    " remote_instances, decision, reason, state, first_seen, last_seen, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        series_uid,
                        study_uid,
                        origin,
                        modality,
                        description,
                        series_number,
                        remote_instances,
                        decision,
                        reason,
                        state,
                        now,
                        now,
                        now,
                    ),
                )
                self._event(db, series_uid, "queried", f"{state}: {reason}")
            else:
                state = str(row["state"])
                if not selected and state in ("pending", "failed", "gone"):
                    state = "skipped"
                elif selected and state in ("skipped", "gone"):
                    state = "pending"
                db.execute(
                    "UPDATE pacs_series SET study_uid = ?, origin = ?, modality = ?, description = ?,"
                    " series_number = ?, remote_instances = ?, decision = ?, reason = ?, state = ?, last_seen = ?,"
                    " updated_at = ? WHERE series_uid = ?",
                    (
                        study_uid,
                        origin,
                        modality,
                        description,
                        series_number,
                        remote_instances,
                        decision,
                        reason,
                        state,
                        now,
                        now,
                        series_uid,
                    ),
                )
                if state != row["state"]:
                    self._event(db, series_uid, state, reason)
            return dict(db.execute("SELECT * FROM pacs_series WHERE series_uid = ?", (series_uid,)).fetchone())

    def mark_retrieved(self, series_uid: str, *, input_dir: str, local_instances: int, detail: str = "") -> None:
        """A series' instances are complete in its input folder."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE pacs_series SET state = 'retrieved', input_dir = ?, local_instances = ?, error = NULL,"
                " attempts = attempts + 1, retrieved_at = ?, updated_at = ? WHERE series_uid = ?",
                (input_dir, local_instances, now, now, series_uid),
            )
            self._event(db, series_uid, "retrieved", detail or f"{local_instances} instance(s)")

    def mark_failed(self, series_uid: str, error: str, *, gone: bool = False) -> None:
        """Retrieval failed (``gone``: the series is no longer on the server)."""
        state = "gone" if gone else "failed"
        with self._tx() as db:
            db.execute(
                "UPDATE pacs_series SET state = ?, error = ?, attempts = attempts + 1, updated_at = ?"
                " WHERE series_uid = ?",
                (state, error, time.time(), series_uid),
            )
            self._event(db, series_uid, "gone" if gone else "retrieve_failed", error)

    def note_received(
        self,
        *,
        series_uid: str,
        study_uid: str,
        origin: str,
        modality: str,
        description: str,
        series_number: int | None,
    ) -> None:
        """An instance of a pushed series arrived (listener): the series is ``receiving``."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM pacs_series WHERE series_uid = ?", (series_uid,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO pacs_series (series_uid, study_uid, origin, modality, description, series_number,"
                    " decision, reason, state, first_seen, last_seen, last_received, updated_at, local_instances)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'selected', 'pushed to the listener', 'receiving', ?, ?, ?, ?, 1)",
                    (series_uid, study_uid, origin, modality, description, series_number, now, now, now, now),
                )
                self._event(db, series_uid, "receiving", origin)
            else:
                if row["state"] != "receiving":
                    self._event(db, series_uid, "receiving", f"more instances from {origin}")
                db.execute(
                    "UPDATE pacs_series SET state = 'receiving', last_received = ?, last_seen = ?, updated_at = ?,"
                    " local_instances = COALESCE(local_instances, 0) + 1 WHERE series_uid = ?",
                    (now, now, now, series_uid),
                )

    def quiet_series(self, quiet_s: float) -> list[dict[str, Any]]:
        """``receiving`` series with no new instance for ``quiet_s`` seconds."""
        limit = time.time() - quiet_s
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM pacs_series WHERE state = 'receiving' AND COALESCE(last_received, 0) <= ?"
                " ORDER BY last_received",
                (limit,),
            ).fetchall()
        return [dict(r) for r in rows]

    def complete_received(self, series_uid: str, *, seen_at: float, input_dir: str, local_instances: int) -> bool:
        """Mark a received series complete unless an instance arrived after ``seen_at``."""
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE pacs_series SET state = 'retrieved', input_dir = ?, local_instances = ?, retrieved_at = ?,"
                " updated_at = ?, error = NULL WHERE series_uid = ? AND state = 'receiving'"
                " AND COALESCE(last_received, 0) <= ?",
                (input_dir, local_instances, now, now, series_uid, seen_at),
            )
            if cursor.rowcount == 1:
                self._event(db, series_uid, "complete", f"{local_instances} instance(s) after the quiet period")
                return True
        return False

    def series(self, series_uid: str) -> dict[str, Any] | None:
        """One row of ``pacs_series``."""
        with self._lock:
            row = self._db.execute("SELECT * FROM pacs_series WHERE series_uid = ?", (series_uid,)).fetchone()
        return None if row is None else dict(row)

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``pacs_series`` (optionally one state)."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM pacs_series ORDER BY series_uid").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM pacs_series WHERE state = ? ORDER BY series_uid", (state,)
                ).fetchall()
        return [dict(r) for r in rows]

    # ------------------------------------------------------------ results
    def stored(self, key: str, destination: str, kind: str, sop_instance_uid: str) -> bool:
        """Whether this result object is recorded as stored at ``destination``."""
        with self._lock:
            row = self._db.execute(
                "SELECT state FROM pacs_stored WHERE key = ? AND destination = ? AND kind = ? AND sop_instance_uid = ?",
                (key, destination, kind, sop_instance_uid),
            ).fetchone()
        return row is not None and row["state"] == "stored"

    def record_store(
        self,
        *,
        key: str,
        destination: str,
        kind: str,
        sop_instance_uid: str,
        series_uid: str,
        study_uid: str,
        file: str,
        source_series_uid: str,
        error: str | None = None,
        detail: str = "",
    ) -> None:
        """Record a store attempt's outcome (``error`` ``None``: stored)."""
        now = time.time()
        state = "stored" if error is None else "failed"
        with self._tx() as db:
            db.execute(
                "INSERT INTO pacs_stored (key, destination, kind, sop_instance_uid, series_uid, study_uid, file, state,"
                " attempts, error, stored_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)"
                " ON CONFLICT (key, destination, kind, sop_instance_uid) DO UPDATE SET state = excluded.state,"
                " attempts = attempts + 1, error = excluded.error, file = excluded.file,"
                " stored_at = COALESCE(excluded.stored_at, stored_at), updated_at = excluded.updated_at",
                (
                    key,
                    destination,
                    kind,
                    sop_instance_uid,
                    series_uid,
                    study_uid,
                    file,
                    state,
                    error,
                    now if error is None else None,
                    now,
                ),
            )
            event = "stored" if error is None else "store_failed"
            self._event(
                db, source_series_uid, event, f"{kind} {sop_instance_uid} -> {destination}: {error or detail or 'ok'}"
            )

    def stored_rows(self, destination: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``pacs_stored``."""
        with self._lock:
            if destination is None:
                rows = self._db.execute("SELECT * FROM pacs_stored ORDER BY key, kind").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM pacs_stored WHERE destination = ? ORDER BY key, kind", (destination,)
                ).fetchall()
        return [dict(r) for r in rows]

    def events(self, series_uid: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        """Events, oldest first, optionally filtered."""
        query, args = "SELECT * FROM pacs_events WHERE 1 = 1", list[str]()
        if series_uid is not None:
            query, args = query + " AND series_uid = ?", [*args, series_uid]
        if event is not None:
            query, args = query + " AND event = ?", [*args, event]
        with self._lock:
            return [dict(r) for r in self._db.execute(query + " ORDER BY id", args).fetchall()]

    def summary(self, *, max_failures: int = 200) -> dict[str, Any]:
        """Transfer counts per state, transfer failures with reasons, store counts and failures."""
        with self._lock:
            counts = {s: 0 for s in TRANSFER_STATES}
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM pacs_series GROUP BY state"):
                counts[str(state)] = int(n)
            failures = [
                {"series_uid": r[0], "state": r[1], "error": r[2]}
                for r in self._db.execute(
                    "SELECT series_uid, state, error FROM pacs_series WHERE state IN ('failed', 'gone')"
                    " ORDER BY series_uid LIMIT ?",
                    (max_failures,),
                )
            ]
            skipped = Counter(
                str(r[0]) for r in self._db.execute("SELECT reason FROM pacs_series WHERE state = 'skipped'")
            )
            stored = {
                str(state): int(n)
                for state, n in self._db.execute("SELECT state, COUNT(*) FROM pacs_stored GROUP BY state")
            }
            store_failures = [
                {"key": r[0], "kind": r[1], "destination": r[2], "error": r[3]}
                for r in self._db.execute(
                    "SELECT key, kind, destination, error FROM pacs_stored WHERE state = 'failed' ORDER BY key LIMIT ?",
                    (max_failures,),
                )
            ]
        return {
            "series": sum(counts.values()),
            "transfer": counts,
            "transfer_failures": failures,
            "skipped_reasons": dict(skipped.most_common(30)),
            "stored": {"stored": stored.get("stored", 0), "failed": stored.get("failed", 0)},
            "store_failures": store_failures,
        }
