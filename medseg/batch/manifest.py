"""The batch manifest: one SQLite database recording every series and what happened to it.

Tables:

* ``series`` - one row per series key: header summary, the input file list and its
  fingerprint (sorted relative paths + sizes + mtimes), the selection decision and reason,
  the state (``pending``, ``running``, ``done``, ``failed``, ``skipped``), the claim (owner,
  claim id, lease), output folder and files, timings, error;
* ``events`` - an append-only log (``discovered``, ``claimed``, ``done``, ``failed``,
  ``reclaimed``, ``reset``, ...): a series processed to completion has exactly one ``done``
  event per processing, so "nothing done twice" is checkable;
* ``ignored`` - files that are not part of any series, with the reason.

Consistency: the connection is in autocommit mode and every change is one explicit
``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction (the write lock is taken up front, so two
processes can never claim the same row), the journal is WAL with ``synchronous=FULL``, and
a row becomes ``done`` in the same transaction that checks the claim is still held, while
the output folder is renamed into place under that lock.  A process killed at any moment
leaves either the old or the new state; ``running`` rows whose owner is gone are reclaimed
by the next run (:meth:`Manifest.reclaim`).

Limits: WAL needs shared memory between the processes that use the database, i.e. one host, and
SQLite's locking is unreliable on network filesystems: the manifest belongs on the local disk of
the one process that drives a run (several processes on that host may share it safely).  Work
on other machines goes through ``medseg batch --engine ray``, whose workers never open it.
Owner liveness is checked through ``/proc``; a row owned by another host (a manifest copied
between machines) is reclaimed only when its lease (renewed by a heartbeat) has expired.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.batch.sqlite import connect, create_schema, immediate_transaction
from medseg.errors import MedsegError
from medseg.types import PathLike

__all__ = [
    "STATES",
    "Claim",
    "Manifest",
    "Owner",
    "SeriesRecord",
    "fingerprint_files",
    "key_hash",
]

STATES = ("pending", "running", "done", "failed", "skipped")
SCHEMA_VERSION = "1"
#: Stages in which a dying process counts against the series (it may be what kills it).
_CRASH_STAGES = ("loading", "infer", "writing")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    key_hash INTEGER NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    num_files INTEGER NOT NULL DEFAULT 0,
    files TEXT NOT NULL DEFAULT '[]',
    fingerprint TEXT NOT NULL DEFAULT '',
    decision TEXT NOT NULL CHECK (decision IN ('selected', 'skipped')),
    selection TEXT,
    reason TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    stage TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    crashes INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    claim_id TEXT,
    lease_until REAL,
    out_dir TEXT,
    outputs TEXT,
    model_id TEXT,
    done_fingerprint TEXT,
    error TEXT,
    timings TEXT,
    discovered_at REAL,
    last_seen REAL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL
);
CREATE INDEX IF NOT EXISTS series_state ON series (state, key_hash);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    owner TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_key ON events (key, event);
CREATE TABLE IF NOT EXISTS ignored (path TEXT PRIMARY KEY, reason TEXT NOT NULL, seen_at REAL NOT NULL);
"""


def key_hash(key: str) -> int:
    """Stable 31-bit hash of a series key (stored with each row)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") & 0x7FFFFFFF


def fingerprint_files(root: Path, files: Iterable[PathLike]) -> tuple[list[str], str]:
    """Sorted relative paths and a SHA-256 over ``path, size, mtime_ns`` of each file.

    Raises:
        OSError: A file vanished while being fingerprinted.
    """
    rel = sorted({os.path.relpath(Path(f), root) for f in files})
    digest = hashlib.sha256()
    for name in rel:
        st = os.stat(root / name)
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return rel, digest.hexdigest()


def _proc_start(pid: int) -> str:
    """Start time (clock ticks since boot) of ``pid`` from ``/proc``; ``""`` if unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


@dataclass(frozen=True)
class Owner:
    """A process that can hold claims: host, pid and the pid's start time (guards pid reuse)."""

    host: str
    pid: int
    start: str

    @classmethod
    def current(cls) -> Owner:
        """This process."""
        return cls(socket.gethostname(), os.getpid(), _proc_start(os.getpid()))

    @classmethod
    def parse(cls, text: str | None) -> Owner | None:
        """Inverse of ``str(owner)``."""
        if not text:
            return None
        host, _, rest = text.rpartition("|")
        pid, _, start = rest.partition(":")
        try:
            return cls(host, int(pid), start)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"{self.host}|{self.pid}:{self.start}"

    def alive(self) -> bool | None:
        """True/False on this host; ``None`` (unknown) for another host."""
        if self.host != socket.gethostname():
            return None
        if self.start:
            current = _proc_start(self.pid)
            if current:
                return current == self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@dataclass
class SeriesRecord:
    """What discovery knows of one series (input to :meth:`Manifest.sync`)."""

    key: str
    files: list[str]
    fingerprint: str
    decision: bool
    reason: str
    selection: str | None = None
    series_uid: str = ""
    study_uid: str = ""
    modality: str = ""
    description: str = ""
    series_number: int | None = None
    notes: str = ""


@dataclass
class Claim:
    """A series claimed by this process (state ``running``)."""

    key: str
    claim_id: str
    files: list[str]
    fingerprint: str
    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    attempts: int
    out_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SyncStats:
    """Counts of what :meth:`Manifest.sync` did."""

    new: int = 0
    unchanged: int = 0
    changed: int = 0
    reset: int = 0
    retried: int = 0


class Manifest:
    """The SQLite manifest of a batch output folder (thread-safe: one connection, one lock).

    Args:
        path: Database file (created with the schema if missing).
        busy_timeout_s: How long to wait for another process's write lock.
        owner: Claim owner identity (default: this process).
    """

    def __init__(
        self,
        path: PathLike,
        *,
        busy_timeout_s: float = 120.0,
        owner: Owner | None = None,
    ) -> None:
        self.path = Path(path)
        self.owner = owner or Owner.current()
        self._lock = threading.RLock()
        try:
            self._db = connect(self.path, busy_timeout_s=busy_timeout_s, journal_mode="WAL", foreign_keys=True)
            self.journal_mode = str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).upper()
            with self._tx() as db:
                found = create_schema(db, _SCHEMA, meta_table="meta", version=SCHEMA_VERSION)
                if found != SCHEMA_VERSION:
                    raise MedsegError(f"{self.path}: manifest schema {found} is not supported (need {SCHEMA_VERSION})")
        except sqlite3.DatabaseError as exc:
            raise MedsegError(f"{self.path}: cannot open the batch manifest ({exc})") from exc

    # ------------------------------------------------------------------ basics
    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Manifest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction holding the database's write lock from the start."""
        return immediate_transaction(self._db, self._lock)

    def _event(self, db: sqlite3.Connection, key: str, event: str, detail: str = "") -> None:
        db.execute(
            "INSERT INTO events (key, event, at, owner, detail) VALUES (?, ?, ?, ?, ?)",
            (key, event, time.time(), str(self.owner), detail),
        )

    def get_meta(self, key: str) -> str | None:
        """A value of the ``meta`` table."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Set a value of the ``meta`` table."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # --------------------------------------------------------------- discovery
    def sync(
        self,
        records: Iterable[SeriesRecord],
        *,
        model_id: str,
        outputs: Iterable[str],
        retry_failed: bool = False,
        chunk: int = 500,
    ) -> SyncStats:
        """Record discovered series; decide which need (re)processing.

        New selected series become ``pending``, new non-selected ones ``skipped``.  For known
        series: changed inputs, another model or outputs not produced yet send ``done`` rows back
        to ``pending``; ``failed`` rows go back with changed inputs or ``retry_failed``; rules that
        no longer select a ``pending``/``failed`` row make it ``skipped``.  ``running`` rows are
        left to their owner (see :meth:`reclaim`).
        """
        wanted = set(outputs)
        stats = SyncStats()
        batch: list[SeriesRecord] = []
        for record in records:
            batch.append(record)
            if len(batch) >= chunk:
                self._sync_chunk(batch, model_id, wanted, retry_failed, stats)
                batch = []
        if batch:
            self._sync_chunk(batch, model_id, wanted, retry_failed, stats)
        return stats

    def _sync_chunk(
        self, records: list[SeriesRecord], model_id: str, wanted: set[str], retry_failed: bool, stats: SyncStats
    ) -> None:
        now = time.time()
        with self._tx() as db:
            for r in records:
                row = db.execute("SELECT * FROM series WHERE key = ?", (r.key,)).fetchone()
                header = (
                    r.series_uid,
                    r.study_uid,
                    r.modality,
                    r.description,
                    r.series_number,
                    len(r.files),
                    json.dumps(r.files),
                    r.fingerprint,
                    "selected" if r.decision else "skipped",
                    r.selection,
                    r.reason,
                    r.notes,
                )
                if row is None:
                    state = "pending" if r.decision else "skipped"
                    db.execute(
                        "INSERT INTO series (series_uid, study_uid, modality, description, series_number, num_files,"
                        " files, fingerprint, decision, selection, reason, notes, key, key_hash, state,"
                        " discovered_at, last_seen, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                        " ?, ?, ?)",
                        (*header, r.key, key_hash(r.key), state, now, now, now),
                    )
                    self._event(db, r.key, "discovered", f"{state}: {r.reason}")
                    stats.new += 1
                    continue
                changed = row["fingerprint"] != r.fingerprint
                stats.changed += changed
                stats.unchanged += not changed
                new_state, why = self._resync_state(row, r, changed, model_id, wanted, retry_failed)
                db.execute(
                    "UPDATE series SET series_uid = ?, study_uid = ?, modality = ?, description = ?,"
                    " series_number = ?, num_files = ?, files = ?, fingerprint = ?, decision = ?, selection = ?,"
                    " reason = ?, notes = ?, last_seen = ?, updated_at = ? WHERE key = ?",
                    (*header, now, now, r.key),
                )
                if new_state != row["state"]:
                    db.execute(
                        "UPDATE series SET state = ?, error = NULL, crashes = 0 WHERE key = ?", (new_state, r.key)
                    )
                    self._event(db, r.key, "reset" if new_state == "pending" else new_state, why)
                    if row["state"] == "failed" and new_state == "pending":
                        stats.retried += 1
                    elif new_state == "pending":
                        stats.reset += 1

    @staticmethod
    def _resync_state(
        row: sqlite3.Row, r: SeriesRecord, changed: bool, model_id: str, wanted: set[str], retry_failed: bool
    ) -> tuple[str, str]:
        state = str(row["state"])
        if state == "running":
            return state, ""
        if not r.decision:
            if state in ("pending", "failed", "skipped"):
                return "skipped", r.reason
            return state, ""
        if state == "skipped":
            return "pending", "now selected: " + r.reason
        if state == "failed":
            if changed:
                return "pending", "inputs changed since the failure"
            return ("pending", "--retry-failed") if retry_failed else (state, "")
        if state == "done":
            produced = set(json.loads(row["outputs"] or "[]"))
            if changed or row["done_fingerprint"] != r.fingerprint:
                return "pending", "inputs changed since it was done"
            if row["model_id"] != model_id:
                return "pending", "another model than the one that produced the outputs"
            if not wanted <= produced:
                return "pending", f"outputs {sorted(wanted - produced)} requested but not produced yet"
        return state, ""

    def add_ignored(self, items: Iterable[tuple[str, str]], *, chunk: int = 1000) -> None:
        """Record files that belong to no series, with the reason."""
        now = time.time()
        batch: list[tuple[str, str, float]] = []
        for path, reason in items:
            batch.append((path, reason, now))
            if len(batch) >= chunk:
                with self._tx() as db:
                    db.executemany("INSERT OR REPLACE INTO ignored (path, reason, seen_at) VALUES (?, ?, ?)", batch)
                batch = []
        if batch:
            with self._tx() as db:
                db.executemany("INSERT OR REPLACE INTO ignored (path, reason, seen_at) VALUES (?, ?, ?)", batch)

    # ------------------------------------------------------------------ claims
    def reclaim(self, *, max_attempts: int = 3) -> list[str]:
        """Return ``running`` rows of dead owners (or with an expired lease) to ``pending``.

        A series whose owner died ``max_attempts`` times while loading, predicting or writing it
        is marked ``failed`` instead (it may be what kills the process: out of memory, a crash).

        Returns:
            The reclaimed keys.
        """
        now = time.time()
        reclaimed: list[str] = []
        with self._tx() as db:
            rows = db.execute("SELECT * FROM series WHERE state = 'running'").fetchall()
            for row in rows:
                owner = Owner.parse(row["owner"])
                alive = owner.alive() if owner else False
                expired = row["lease_until"] is None or row["lease_until"] < now
                if alive or (alive is None and not expired):
                    continue
                crashes = int(row["crashes"]) + (row["stage"] in _CRASH_STAGES)
                why = f"owner {'gone' if alive is False else 'lease expired'} during stage {row['stage']}"
                if crashes >= max_attempts:
                    error = (
                        f"the process died {crashes} time(s) while processing this series (last stage:"
                        f" {row['stage']}); out of memory or a crash? (--retry-failed to try again)"
                    )
                    db.execute(
                        "UPDATE series SET state = 'failed', error = ?, crashes = ?, owner = NULL, claim_id = NULL,"
                        " lease_until = NULL, stage = NULL, finished_at = ?, updated_at = ? WHERE key = ?",
                        (error, crashes, now, now, row["key"]),
                    )
                    self._event(db, row["key"], "failed", error)
                else:
                    db.execute(
                        "UPDATE series SET state = 'pending', crashes = ?, owner = NULL, claim_id = NULL,"
                        " lease_until = NULL, stage = NULL, updated_at = ? WHERE key = ?",
                        (crashes, now, row["key"]),
                    )
                    self._event(db, row["key"], "reclaimed", why)
                reclaimed.append(str(row["key"]))
        return reclaimed

    def claim(self, *, lease_s: float = 300.0) -> Claim | None:
        """Atomically take the next ``pending`` series (``None`` when none is left)."""
        now = time.time()
        claim_id = uuid.uuid4().hex
        with self._tx() as db:
            row = db.execute("SELECT * FROM series WHERE state = 'pending' ORDER BY key LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE series SET state = 'running', stage = 'claimed', owner = ?, claim_id = ?, lease_until = ?,"
                " attempts = attempts + 1, started_at = ?, updated_at = ?, error = NULL WHERE key = ?"
                " AND state = 'pending'",
                (str(self.owner), claim_id, now + lease_s, now, now, row["key"]),
            )
            self._event(db, row["key"], "claimed", claim_id)
        return Claim(
            key=str(row["key"]),
            claim_id=claim_id,
            files=list(json.loads(row["files"])),
            fingerprint=str(row["fingerprint"]),
            series_uid=str(row["series_uid"]),
            study_uid=str(row["study_uid"]),
            modality=str(row["modality"]),
            description=str(row["description"]),
            series_number=row["series_number"],
            attempts=int(row["attempts"]) + 1,
            out_dir=row["out_dir"],
        )

    def set_stage(self, claim: Claim, stage: str) -> None:
        """Record how far the processing of a claimed series got (for crash accounting)."""
        with self._tx() as db:
            db.execute(
                "UPDATE series SET stage = ?, updated_at = ? WHERE key = ? AND claim_id = ?",
                (stage, time.time(), claim.key, claim.claim_id),
            )

    def renew(self, claim_ids: Iterable[str], *, lease_s: float = 300.0) -> None:
        """Extend the lease of claims still held (the heartbeat)."""
        ids = list(claim_ids)
        if not ids:
            return
        with self._tx() as db:
            db.executemany(
                "UPDATE series SET lease_until = ? WHERE claim_id = ? AND state = 'running'",
                [(time.time() + lease_s, cid) for cid in ids],
            )

    def complete(
        self,
        claim: Claim,
        *,
        out_dir: str,
        outputs: Iterable[str],
        model_id: str,
        timings: dict[str, float] | None = None,
        commit: Callable[[], None] | None = None,
        detail: str = "",
    ) -> bool:
        """Mark a claimed series ``done``, running ``commit`` (the output rename) inside the transaction.

        Returns:
            False (and ``commit`` not run) when the claim was lost to a reclaim.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state, claim_id FROM series WHERE key = ?", (claim.key,)).fetchone()
            if row is None or row["state"] != "running" or row["claim_id"] != claim.claim_id:
                return False
            if commit is not None:
                commit()
            db.execute(
                "UPDATE series SET state = 'done', stage = NULL, owner = NULL, claim_id = NULL, lease_until = NULL,"
                " out_dir = ?, outputs = ?, model_id = ?, done_fingerprint = ?, error = NULL, timings = ?,"
                " finished_at = ?, updated_at = ?, crashes = 0 WHERE key = ?",
                (
                    out_dir,
                    json.dumps(sorted(set(outputs))),
                    model_id,
                    claim.fingerprint,
                    json.dumps(timings or {}),
                    now,
                    now,
                    claim.key,
                ),
            )
            self._event(db, claim.key, "done", detail or claim.claim_id)
        return True

    def fail(self, claim: Claim, error: str, *, timings: dict[str, float] | None = None) -> bool:
        """Mark a claimed series ``failed`` with the (already redacted) error message."""
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'failed', stage = NULL, owner = NULL, claim_id = NULL, lease_until = NULL,"
                " error = ?, timings = ?, finished_at = ?, updated_at = ? WHERE key = ? AND claim_id = ?"
                " AND state = 'running'",
                (error, json.dumps(timings or {}), now, now, claim.key, claim.claim_id),
            )
            if cursor.rowcount != 1:
                return False
            self._event(db, claim.key, "failed", error)
        return True

    def release(self, claim: Claim, *, why: str = "interrupted") -> None:
        """Give a claim back (``pending``) without counting it as an attempt's failure."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'pending', stage = NULL, owner = NULL, claim_id = NULL, lease_until = NULL,"
                " updated_at = ? WHERE key = ? AND claim_id = ? AND state = 'running'",
                (time.time(), claim.key, claim.claim_id),
            )
            if cursor.rowcount == 1:
                self._event(db, claim.key, "released", why)

    # ----------------------------------------------------------------- queries
    def count(self, state: str | None = None) -> int:
        """Rows in ``state`` (all states with ``None``)."""
        where = "WHERE state = ?" if state else ""
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM series {where}", [state] if state else []).fetchone()
        return int(row[0])

    def running_claim_ids(self) -> set[str]:
        """Claim ids of every ``running`` row (any owner)."""
        with self._lock:
            rows = self._db.execute("SELECT claim_id FROM series WHERE state = 'running'").fetchall()
        return {str(r[0]) for r in rows if r[0]}

    def rows(self, state: str | None = None) -> list[dict[str, Any]]:
        """Series rows as dicts (optionally one state), ordered by key."""
        where = "WHERE state = ?" if state else ""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM series {where} ORDER BY key", [state] if state else []).fetchall()
        return [dict(r) for r in rows]

    def reset(self, key: str, why: str) -> bool:
        """Send a ``done``/``failed``/``skipped`` series back to ``pending`` (e.g. its outputs vanished)."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'pending', error = NULL, crashes = 0, updated_at = ? WHERE key = ?"
                " AND state IN ('done', 'failed', 'skipped') AND decision = 'selected'",
                (time.time(), key),
            )
            if cursor.rowcount == 1:
                self._event(db, key, "reset", why)
                return True
        return False

    def events(self, key: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        """Events, oldest first, optionally filtered."""
        query, args = "SELECT * FROM events WHERE 1 = 1", list[str]()
        if key is not None:
            query, args = query + " AND key = ?", [*args, key]
        if event is not None:
            query, args = query + " AND event = ?", [*args, event]
        with self._lock:
            return [dict(r) for r in self._db.execute(query + " ORDER BY id", args).fetchall()]

    def completion_counts(self) -> dict[str, int]:
        """Number of ``done`` events per series key."""
        with self._lock:
            rows = self._db.execute("SELECT key, COUNT(*) FROM events WHERE event = 'done' GROUP BY key").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def summary(self, *, max_failures: int = 200, max_reasons: int = 30) -> dict[str, Any]:
        """Counts per state, failures with reasons, skip and ignore reasons (no patient data)."""
        with self._lock:
            counts = {s: 0 for s in STATES}
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state"):
                counts[str(state)] = int(n)
            failed = [
                {"key": r[0], "description": r[1], "error": r[2]}
                for r in self._db.execute(
                    "SELECT key, description, error FROM series WHERE state = 'failed' ORDER BY key LIMIT ?",
                    (max_failures,),
                )
            ]
            skipped = Counter(str(r[0]) for r in self._db.execute("SELECT reason FROM series WHERE state = 'skipped'"))
            ignored = Counter(str(r[0]).split(":")[0] for r in self._db.execute("SELECT reason FROM ignored"))
        return {
            "series": sum(counts.values()),
            "counts": counts,
            "failed": failed,
            "skipped_reasons": dict(skipped.most_common(max_reasons)),
            "ignored_files": dict(ignored.most_common(max_reasons)),
            "complete": counts["pending"] == 0 and counts["running"] == 0,
        }
