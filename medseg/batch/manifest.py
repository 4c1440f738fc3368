"""The batch manifest: one SQLite database recording every series and what happened to it.

Tables:

* ``series`` - one row per series key: header summary (patient *pseudonym*, study date, series
  number, description - never a name or ID), the input file list and its fingerprint (sorted
  relative paths + sizes + mtimes), the selection decision and reason, the state (``pending``,
  ``running``, ``done``, ``partial``, ``failed``, ``skipped``), the claim (owner, claim id,
  lease), output folder, the status of every output (``output_status``: files written, or the
  error of an output that failed), timings, error;
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

States: ``done`` - every requested output was written; ``partial`` - the series was segmented
and some outputs were written while others failed (the reasons are in ``output_status``; the
written ones are kept, ``--retry-failed`` makes only the missing ones); ``failed`` - nothing was
written (loading or prediction failed); ``skipped`` - not selected by the rules, not an image
series, or not fit for the model (``skipped_for`` records the model and inputs a voxel-level
check rejected, so that the series is not loaded again until one of them changes).

Schema versions: 2 (this one) adds ``patient``, ``study_date``, ``output_status``,
``skipped_for`` and the ``partial`` state; a version-1 manifest is migrated in place when opened
(one transaction; ``output_status`` of its done rows is derived from their ``outputs``).  A newer
version is refused with a clear error.

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

STATES = ("pending", "running", "done", "partial", "failed", "skipped")
SCHEMA_VERSION = "2"
#: Columns of a version-1 ``series`` table (copied as they are by the migration).
_V1_COLUMNS = (
    "key, key_hash, series_uid, study_uid, modality, description, series_number, num_files, files, fingerprint,"
    " decision, selection, reason, notes, state, stage, attempts, crashes, owner, claim_id, lease_until, out_dir,"
    " outputs, model_id, done_fingerprint, error, timings, discovered_at, last_seen, started_at, finished_at,"
    " updated_at"
)
#: Stages in which a dying process counts against the series (it may be what kills it).
_CRASH_STAGES = ("loading", "infer", "writing")

_SERIES_TABLE = f"""
CREATE TABLE IF NOT EXISTS series (
    key TEXT PRIMARY KEY,
    key_hash INTEGER NOT NULL,
    series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    series_number INTEGER,
    patient TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
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
    output_status TEXT,
    skipped_for TEXT,
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
"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_SERIES_TABLE}
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


def _migrate_v1(db: sqlite3.Connection) -> None:
    """Rebuild a version-1 ``series`` table as version 2 (inside the caller's transaction).

    The state CHECK constraint gains ``partial`` (SQLite cannot alter a constraint, hence the copy);
    the new columns start empty, except ``output_status`` of done rows, derived from ``outputs``.
    """
    from medseg.infer.writers import OutputNames

    db.execute("DROP INDEX IF EXISTS series_state")
    db.execute("ALTER TABLE series RENAME TO series_v1")
    for statement in _SERIES_TABLE.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute(f"INSERT INTO series ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM series_v1")
    db.execute("DROP TABLE series_v1")
    names = OutputNames()
    for row in db.execute("SELECT key, outputs FROM series WHERE state = 'done'").fetchall():
        kinds = json.loads(row["outputs"] or "[]")
        status = {kind: {"files": names.files(kind)} for kind in kinds}
        db.execute("UPDATE series SET output_status = ? WHERE key = ?", (json.dumps(status), row["key"]))
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
    db.execute(
        "INSERT INTO events (key, event, at, owner, detail) VALUES ('', 'migrated', ?, '', 'schema 1 -> 2')",
        (time.time(),),
    )


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
    patient: str = ""
    study_date: str = ""


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
    patient: str = ""
    study_date: str = ""
    #: What an earlier processing left: ``state``, ``model_id``, ``done_fingerprint``, ``output_status``.
    previous: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How messages name the series: patient pseudonym, study date, series number, description."""
        return series_label(
            patient=self.patient,
            study_date=self.study_date,
            series_number=self.series_number,
            description=self.description,
        )


def series_label(*, patient: str, study_date: str, series_number: int | None, description: str) -> str:
    """``patient P3c9a1e, study 2019-03-04, series 7 'T1 post'`` (no names, no IDs: ``patient`` is a pseudonym)."""
    date = study_date.strip()
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    parts = [
        f"patient {patient or '?'}",
        f"study {date or '?'}",
        f"series {series_number if series_number is not None else '?'}",
    ]
    return ", ".join(parts) + (f" '{description}'" if description else "")


@dataclass(frozen=True)
class _SyncPolicy:
    model_id: str
    wanted: set[str]
    retry_failed: bool
    compat_check: bool


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
                if found == "1":
                    _migrate_v1(db)
                elif found != SCHEMA_VERSION:
                    raise MedsegError(
                        f"{self.path}: batch manifest schema {found} is not supported by this medseg (it reads"
                        f" {SCHEMA_VERSION} and migrates 1); use the medseg version that wrote it or a new --out"
                    )
                if db.execute("SELECT 1 FROM meta WHERE key = 'pseudonym_key'").fetchone() is None:
                    db.execute("INSERT INTO meta (key, value) VALUES ('pseudonym_key', ?)", (os.urandom(16).hex(),))
            self._pseudonym_key = bytes.fromhex(self.get_meta("pseudonym_key") or "")
        except sqlite3.DatabaseError as exc:
            raise MedsegError(f"{self.path}: cannot open the batch manifest ({exc})") from exc

    def pseudonym(self, patient_id: str) -> str:
        """A short stable pseudonym of a PatientID for this manifest (``P`` + 6 hex digits; ``""`` if none).

        Keyed with a random secret kept in this manifest (HMAC-SHA256), so that the pseudonym is not a
        plain hash of the ID and pseudonyms of two output folders cannot be linked.
        """
        import hmac

        text = (patient_id or "").strip()
        if not text:
            return ""
        return "P" + hmac.new(self._pseudonym_key, text.encode(), hashlib.sha256).hexdigest()[:6]

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
        compat_check: bool = True,
        chunk: int = 500,
    ) -> SyncStats:
        """Record discovered series; decide which need (re)processing.

        New selected series become ``pending``, new non-selected ones ``skipped``.  For known
        series: changed inputs, another model or outputs not produced yet send ``done`` and
        ``partial`` rows back to ``pending``; ``failed`` and ``partial`` rows go back with changed
        inputs or ``retry_failed``; rules that no longer select a ``pending``/``failed`` row make
        it ``skipped``; a series skipped by the voxel-level model check stays skipped while the
        model and its inputs are the same and ``compat_check`` is on.  ``running`` rows are left
        to their owner (see :meth:`reclaim`).
        """
        wanted = set(outputs)
        stats = SyncStats()
        batch: list[SeriesRecord] = []
        policy = _SyncPolicy(model_id, wanted, retry_failed, compat_check)
        for record in records:
            batch.append(record)
            if len(batch) >= chunk:
                self._sync_chunk(batch, policy, stats)
                batch = []
        if batch:
            self._sync_chunk(batch, policy, stats)
        return stats

    def _sync_chunk(self, records: list[SeriesRecord], policy: _SyncPolicy, stats: SyncStats) -> None:
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
                    r.patient,
                    r.study_date,
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
                        "INSERT INTO series (series_uid, study_uid, modality, description, series_number, patient,"
                        " study_date, num_files, files, fingerprint, decision, selection, reason, notes, key, key_hash,"
                        " state, discovered_at, last_seen, updated_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (*header, r.key, key_hash(r.key), state, now, now, now),
                    )
                    self._event(db, r.key, "discovered", f"{state}: {r.reason}")
                    stats.new += 1
                    continue
                changed = row["fingerprint"] != r.fingerprint
                stats.changed += changed
                stats.unchanged += not changed
                new_state, why = self._resync_state(row, r, changed, policy)
                db.execute(
                    "UPDATE series SET series_uid = ?, study_uid = ?, modality = ?, description = ?,"
                    " series_number = ?, patient = ?, study_date = ?, num_files = ?, files = ?, fingerprint = ?,"
                    " decision = ?, selection = ?, reason = ?, notes = ?, last_seen = ?, updated_at = ? WHERE key = ?",
                    (*header, now, now, r.key),
                )
                if new_state != row["state"]:
                    db.execute(
                        "UPDATE series SET state = ?, error = NULL, crashes = 0, skipped_for = NULL WHERE key = ?",
                        (new_state, r.key),
                    )
                    self._event(db, r.key, "reset" if new_state == "pending" else new_state, why)
                    if row["state"] in ("failed", "partial") and new_state == "pending":
                        stats.retried += 1
                    elif new_state == "pending":
                        stats.reset += 1

    @staticmethod
    def _resync_state(row: sqlite3.Row, r: SeriesRecord, changed: bool, policy: _SyncPolicy) -> tuple[str, str]:
        state = str(row["state"])
        if state == "running":
            return state, ""
        if not r.decision:
            if state in ("pending", "failed", "skipped"):
                return "skipped", r.reason
            return state, ""
        if state == "skipped":
            if policy.compat_check and row["skipped_for"] == f"{policy.model_id}:{r.fingerprint}":
                return state, ""  # the model check rejected these very inputs for this very model
            return "pending", "now selected: " + r.reason
        if state == "failed":
            if changed:
                return "pending", "inputs changed since the failure"
            return ("pending", "--retry-failed") if policy.retry_failed else (state, "")
        if state in ("done", "partial"):
            status = json.loads(row["output_status"] or "{}")
            produced = {kind for kind, entry in status.items() if "files" in entry} or set(
                json.loads(row["outputs"] or "[]")
            )
            failed = {kind for kind, entry in status.items() if "error" in entry}
            if changed or row["done_fingerprint"] != r.fingerprint:
                return "pending", f"inputs changed since it was {state}"
            if row["model_id"] != policy.model_id:
                return "pending", "another model than the one that produced the outputs"
            if state == "partial" and policy.retry_failed and failed & policy.wanted:
                return "pending", f"--retry-failed: outputs {sorted(failed & policy.wanted)} failed"
            if not policy.wanted <= produced | failed:
                return "pending", f"outputs {sorted(policy.wanted - produced - failed)} requested but not produced yet"
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
            patient=str(row["patient"] or ""),
            study_date=str(row["study_date"] or ""),
            previous={
                "model_id": row["model_id"],
                "done_fingerprint": row["done_fingerprint"],
                "output_status": json.loads(row["output_status"] or "{}"),
            },
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
        output_status: dict[str, dict[str, Any]] | None = None,
    ) -> bool:
        """Record a claimed series' outputs, running ``commit`` (the output rename) inside the transaction.

        The state is ``done`` when no output failed, else ``partial`` (``error`` then summarises the
        failed outputs; their reasons are in ``output_status``).

        Args:
            claim: The claim.
            out_dir: Output folder relative to the output root.
            outputs: The output kinds present in the folder.
            model_id: Model fingerprint.
            timings: Seconds per stage.
            commit: Called under the lock once the claim is known to be held.
            detail: Event detail.
            output_status: ``{kind: {"files": [...]} | {"error": "..."}}`` (default: every kind written).

        Returns:
            False (and ``commit`` not run) when the claim was lost to a reclaim.
        """
        now = time.time()
        status = output_status if output_status is not None else {kind: {"files": []} for kind in outputs}
        failed = {kind: str(entry["error"]) for kind, entry in status.items() if "error" in entry}
        state = "partial" if failed else "done"
        error = "; ".join(f"{kind} failed: {why}" for kind, why in failed.items()) or None
        with self._tx() as db:
            row = db.execute("SELECT state, claim_id FROM series WHERE key = ?", (claim.key,)).fetchone()
            if row is None or row["state"] != "running" or row["claim_id"] != claim.claim_id:
                return False
            if commit is not None:
                commit()
            db.execute(
                "UPDATE series SET state = ?, stage = NULL, owner = NULL, claim_id = NULL, lease_until = NULL,"
                " out_dir = ?, outputs = ?, output_status = ?, model_id = ?, done_fingerprint = ?, error = ?,"
                " timings = ?, finished_at = ?, updated_at = ?, crashes = 0, skipped_for = NULL WHERE key = ?",
                (
                    state,
                    out_dir,
                    json.dumps(sorted(set(outputs))),
                    json.dumps(status),
                    model_id,
                    claim.fingerprint,
                    error,
                    json.dumps(timings or {}),
                    now,
                    now,
                    claim.key,
                ),
            )
            self._event(db, claim.key, "done", detail or claim.claim_id)
            if failed:
                self._event(db, claim.key, "outputs_failed", error or "")
        return True

    def skip(self, claim: Claim, reason: str, *, model_id: str) -> bool:
        """Mark a claimed series ``skipped`` after loading (the model check rejected its voxels).

        It stays skipped while the model and its inputs are unchanged (``skipped_for``), unless the
        check is switched off.
        """
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'skipped', stage = NULL, owner = NULL, claim_id = NULL, lease_until = NULL,"
                " reason = ?, skipped_for = ?, error = NULL, finished_at = ?, updated_at = ? WHERE key = ?"
                " AND claim_id = ? AND state = 'running'",
                (reason, f"{model_id}:{claim.fingerprint}", now, now, claim.key, claim.claim_id),
            )
            if cursor.rowcount != 1:
                return False
            self._event(db, claim.key, "skipped", reason)
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

    def release_owned(self, *, why: str = "interrupted") -> list[str]:
        """Give back every claim this process (this owner) still holds; returns their keys."""
        with self._tx() as db:
            keys = [
                str(r[0])
                for r in db.execute(
                    "SELECT key FROM series WHERE state = 'running' AND owner = ?", (str(self.owner),)
                ).fetchall()
            ]
            for key in keys:
                db.execute(
                    "UPDATE series SET state = 'pending', stage = NULL, owner = NULL, claim_id = NULL,"
                    " lease_until = NULL, updated_at = ? WHERE key = ? AND state = 'running'",
                    (time.time(), key),
                )
                self._event(db, key, "released", why)
        return keys

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

    def row(self, key: str) -> dict[str, Any] | None:
        """One series row as a dict (``None`` if unknown)."""
        with self._lock:
            found = self._db.execute("SELECT * FROM series WHERE key = ?", (key,)).fetchone()
        return None if found is None else dict(found)

    def reset(self, key: str, why: str) -> bool:
        """Send a ``done``/``partial``/``failed``/``skipped`` series back to ``pending`` (e.g. its outputs vanished)."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE series SET state = 'pending', error = NULL, crashes = 0, updated_at = ? WHERE key = ?"
                " AND state IN ('done', 'partial', 'failed', 'skipped') AND decision = 'selected'",
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

    def summary(self, *, max_failures: int = 200, max_reasons: int = 30, with_outputs: bool = True) -> dict[str, Any]:
        """Counts per state, failures with reasons, every output path, skip and ignore reasons (no patient data).

        Series are named by :func:`series_label` (patient pseudonym, study date, series number,
        description); ``outputs`` lists, per ``done``/``partial`` series, its folder and the files of
        each output kind relative to the output root, and the reason of each failed output.
        """
        with self._lock:
            counts = {s: 0 for s in STATES}
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state"):
                counts[str(state)] = int(n)
            failed = [
                {**_identity(r), "error": r["error"]}
                for r in self._db.execute(
                    "SELECT * FROM series WHERE state = 'failed' ORDER BY key LIMIT ?",
                    (max_failures,),
                )
            ]
            produced = []
            if with_outputs:
                for r in self._db.execute("SELECT * FROM series WHERE state IN ('done', 'partial') ORDER BY key"):
                    status = json.loads(r["output_status"] or "{}")
                    folder = str(r["out_dir"] or "")
                    produced.append(
                        {
                            **_identity(r),
                            "state": r["state"],
                            "out_dir": folder,
                            "files": {
                                kind: [f"{folder}/{name}" for name in entry["files"]]
                                for kind, entry in status.items()
                                if "files" in entry
                            },
                            "failed_outputs": {
                                kind: entry["error"] for kind, entry in status.items() if "error" in entry
                            },
                        }
                    )
            skipped = Counter(str(r[0]) for r in self._db.execute("SELECT reason FROM series WHERE state = 'skipped'"))
            ignored = Counter(str(r[0]).split(":")[0] for r in self._db.execute("SELECT reason FROM ignored"))
        summary = {
            "series": sum(counts.values()),
            "counts": counts,
            "failed": failed,
            "partial": [p for p in produced if p["state"] == "partial"][:max_failures],
            "skipped_reasons": dict(skipped.most_common(max_reasons)),
            "ignored_files": dict(ignored.most_common(max_reasons)),
            "complete": counts["pending"] == 0 and counts["running"] == 0,
        }
        if with_outputs:
            summary["outputs"] = produced
        return summary


def _identity(row: sqlite3.Row) -> dict[str, Any]:
    """How summaries name a series: key, label and its parts (pseudonym, never the PatientID)."""
    return {
        "key": row["key"],
        "series": series_label(
            patient=str(row["patient"] or ""),
            study_date=str(row["study_date"] or ""),
            series_number=row["series_number"],
            description=str(row["description"] or ""),
        ),
        "patient": row["patient"],
        "study_date": row["study_date"],
        "series_number": row["series_number"],
        "description": row["description"],
    }
