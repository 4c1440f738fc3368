"""Batch inference over a DICOM archive: discover, select, predict, write, record.

One call of :func:`run_batch` (one ``medseg batch`` process, or one torchrun rank):

1. **Discovery** (headers only, :func:`medseg.io.dicom.scan_dicom`) groups the archive into
   series; every series gets a decision from the selection rules, then from the model's input
   channels (:func:`medseg.infer.compat.check_header`: modality, channels, 4D), and is streamed
   into the manifest (:mod:`medseg.batch.manifest`) with its input fingerprint and a patient
   pseudonym.  Non-image objects (SR, RTSTRUCT, SEG, ...) become skipped series with the reason;
   non-DICOM and unreadable files are recorded as ignored.
2. **Recovery**: ``running`` rows left by dead processes go back to ``pending``; temporary
   output folders of dead claims are removed.
3. **Processing**: this module is the *driver* (claims, manifest, commits); the work on one
   series is :mod:`medseg.batch.series` (load + voxel-level model check, predict or reuse kept
   labels, write each output independently into a temp folder), which never touches the
   manifest.  Loader threads claim series atomically and read/decode them into a bounded
   queue (``workers`` threads, ``prefetch`` slots) while the main thread predicts and writes the
   previous one, so at most ``workers + prefetch + 1`` volumes are in memory whatever the
   archive size.  The temp folder ``OUT/.tmp/<claim>/`` is renamed to the final folder inside the
   manifest transaction that records the series ``done`` (every output written) or ``partial``
   (some outputs failed: the others are kept, the reasons recorded per output).  A series that
   fails entirely is recorded with its (redacted) reason and the run continues.  Ctrl-C finishes
   the series being written or releases the one in progress, then ends the run.
4. **Summary**: counts per state, failures and partial series with reasons, every output path,
   as ``summary.json`` and returned.

Output layout (names from DICOM attributes are sanitised; nothing can escape ``OUT``)::

    OUT/manifest.sqlite               the manifest (+ -wal/-shm while in use)
    OUT/summary.json                  written when no series is pending or running
    OUT/<StudyInstanceUID>/<SeriesNumber>-<SeriesDescription>-<hash of key>/
        segmentation.nii.gz (+ .json)  label volume on the input grid (``nifti``)
        seg.dcm                        DICOM SEG (``seg``)
        rtstruct.dcm                   RTSTRUCT (``rtstruct``)
        volumes.json                   volume per class in mL (``json``)
        .medseg-series.json            completion marker (key, input fingerprint, model, output status)

Scale-out: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every rank discovers the archive,
keeps the series whose stable key hash falls in its shard (``hash % WORLD_SIZE == RANK``) and
claims them in the shared manifest; see :mod:`medseg.batch.manifest` for the filesystem limits.

Patient names and IDs are never printed or stored in messages: errors are redacted with the
identifying values of the series' own header before they reach the log or the manifest, and
series are named by :func:`medseg.batch.manifest.series_label` (pseudonym, study date, series
number, description).  User documentation: ``docs/batch.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.batch.manifest import Claim, Manifest, SeriesRecord, fingerprint_files, key_hash
from medseg.batch.selection import SelectionRules, SeriesInfo, load_rules, plane_of
from medseg.batch.series import LoadedSeries, SeriesTask, load_claimed_series, load_task, redact, run_task
from medseg.errors import ConfigError, InputError, MedsegError
from medseg.infer.compat import ChannelSpec, check_header, expected_modality
from medseg.infer.writers import OUTPUTS
from medseg.io.images import write_json_atomic
from medseg.types import PathLike

__all__ = [
    "OUTPUTS",
    "BatchOptions",
    "discover_records",
    "distributed_env",
    "load_claimed_series",
    "model_fingerprint",
    "redact",
    "run_batch",
    "series_dir_name",
    "series_listing",
]

MARKER = ".medseg-series.json"
_TMP = ".tmp"
_NOT_SERIES_REASONS = ("not DICOM", "unreadable", "malformed header", "DICOMDIR")


@dataclass
class BatchOptions:
    """Settings of a batch run (the CLI flags).

    Attributes:
        outputs: Any of ``nifti``, ``seg``, ``rtstruct``, ``json``.
        rules: Selection rules YAML (``None``: every image series except localizers).
        retry_failed: Send ``failed`` series back to ``pending``.
        workers: Loader threads reading the next series during inference (0: no prefetch; ``None``:
            2 when inference runs on a GPU, 0 on CPU, where the threads compete with the network for
            the cores and the GIL - measured slower on 2 cores, see ``docs/benchmarks.md``).
        prefetch: Loaded series waiting in the queue (at least 1).
        seg_type: DICOM SEG encoding, ``binary`` or ``labelmap``.
        max_attempts: A series whose process died this often while on it is marked failed.
        lease_s: Claim lease; renewed every ``lease_s / 3`` by a heartbeat.
        progress: Show a progress bar.
        discover: Run discovery (off: work from the manifest as it is).
        process: Process series (off: discovery only).
        rank: This rank (default: ``RANK`` env, else 0).
        world_size: Number of ranks (default: ``WORLD_SIZE`` env, else 1).
        journal_mode: SQLite journal (default ``WAL``; ``DELETE`` for several hosts).
        device: Inference device (default: the model config's; ``cuda:LOCAL_RANK`` under torchrun).
        folds: nnU-Net folds (``"0,1"``, ``"all"``; default: every fold found).
        checkpoint: nnU-Net checkpoint, ``final`` or ``best``.
        infer: Overrides of the model's ``config.infer`` (overlap, precision, mirroring, body crop,
            post-processing, threads: the options ``medseg predict`` has; see
            :func:`medseg.infer.cli.infer_overrides`).
        compat_check: Skip series that do not fit the model (modality, channels, CT intensities;
            :mod:`medseg.infer.compat`) instead of segmenting them.
        handle_sigint: In the main thread, the first Ctrl-C finishes the series being written (or
            releases the one being loaded/predicted) and ends the run normally with ``interrupted`` set.
            Off: ``KeyboardInterrupt`` propagates to the caller (after every claim was released).
    """

    outputs: tuple[str, ...] = ("nifti", "json")
    rules: PathLike | None = None
    retry_failed: bool = False
    workers: int | None = None
    prefetch: int = 2
    seg_type: Literal["binary", "labelmap"] = "binary"
    max_attempts: int = 3
    lease_s: float = 300.0
    progress: bool = True
    discover: bool = True
    process: bool = True
    rank: int | None = None
    world_size: int | None = None
    journal_mode: str | None = None
    device: str | None = None
    folds: str | None = None
    checkpoint: Literal["final", "best"] = "final"
    infer: dict[str, Any] = field(default_factory=dict)
    compat_check: bool = True
    handle_sigint: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible settings."""
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown or not self.outputs:
            raise ConfigError(f"--outputs: unknown {unknown or 'empty list'} (choose from {', '.join(OUTPUTS)})")
        if (self.workers is not None and self.workers < 0) or self.prefetch < 1:
            raise ConfigError("--workers must be >= 0 and --prefetch >= 1")
        if self.seg_type not in ("binary", "labelmap"):
            raise ConfigError(f"--seg-type must be binary or labelmap, got {self.seg_type!r}")
        if self.max_attempts < 1:
            raise ConfigError("--max-attempts must be >= 1")
        if self.infer:
            from pydantic import ValidationError

            from medseg.config import InferConfig

            try:
                InferConfig.model_validate(self.infer)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"inference options: {problems}") from None


# ------------------------------------------------------------------ environment
def distributed_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """``(rank, world_size, local_rank, local_world_size)`` from arguments or torchrun's environment.

    Raises:
        ConfigError: Inconsistent values.
    """
    try:
        world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
        r = int(rank if rank is not None else os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(r if world > 1 else 0)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from exc
    if world < 1 or not 0 <= r < world:
        raise ConfigError(f"invalid rank {r} for world size {world}")
    return r, world, local_rank, max(1, local_world)


def model_fingerprint(model: PathLike, *, folds: str | None = None, checkpoint: str = "final") -> str:
    """Identity of a model (16 hex digits; a medseg model directory: SHA-256 of its weights and plan).

    Raises:
        ModelError: Not a model, or its files cannot be read.
    """
    from medseg.models.adapters import open_model

    return open_model(model, folds=folds, checkpoint=checkpoint).fingerprint()  # type: ignore[arg-type]


_CRASH_COUNTS: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests.

    ``MEDSEG_BATCH_CRASH_AT=<point>[:<n>]`` SIGKILLs this process the n-th time (default: the
    first) it reaches ``point`` (``claimed``, ``loaded``, ``predicted``, ``outputs_written``,
    ``renamed``, ``committed``).
    """
    spec = os.environ.get("MEDSEG_BATCH_CRASH_AT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------- discovery
_KNOWN = {
    "Modality": "modality",
    "SeriesDescription": "description",
    "BodyPartExamined": "body_part",
    "SeriesNumber": "series_number",
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "uid",
    "SOPClassUID": "sop_class_uid",
    "Manufacturer": "manufacturer",
    "FrameOfReferenceUID": "frame_of_reference_uid",
    "PatientID": "patient_id",
    "StudyDate": "study_date",
    "SliceThickness": "slice_thickness",
    "GantryDetectorTilt": "gantry_tilt",
}


def _plain(value: Any) -> Any:
    """Pydicom value -> str / float / int / list."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str)) or value is None:
        return value if not isinstance(value, str) else value.strip()
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value).strip()


def series_info(series: Any, *, extra: Sequence[str] = ()) -> SeriesInfo:
    """What the selection rules see of a discovered series (extra keywords read from its first file)."""
    attrs: dict[str, Any] = {}
    for keyword, attr in _KNOWN.items():
        attrs[keyword] = getattr(series, attr, None)
    attrs["ImageType"] = list(getattr(series, "image_type", ()) or ())
    attrs["NumberOfSlices"] = int(getattr(series, "num_slices", len(series.files)))
    attrs["Rows"] = getattr(series, "rows", None)
    attrs["Columns"] = getattr(series, "cols", None)
    plane, obliquity = plane_of(getattr(series, "orientation", None))
    attrs["Orientation"] = plane or None
    attrs["ObliquityDeg"] = None if np.isnan(obliquity) else obliquity
    missing = [k for k in extra if k not in attrs]
    if missing and series.files:
        import pydicom

        try:
            ds = pydicom.dcmread(series.files[0], stop_before_pixels=True, specific_tags=missing, force=True)
            for keyword in missing:
                attrs[keyword] = _plain(ds.get(keyword)) if keyword in ds else None
        except Exception:  # unreadable here means "attribute missing" for the rules
            pass
    return SeriesInfo(key=series.key or series.uid, attributes=attrs)


def _non_image_series(
    root: Path, skipped: list[tuple[Path, str]]
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, str]]]:
    """Group skipped DICOM objects by SeriesInstanceUID; the rest are ignored files."""
    import pydicom

    groups: dict[str, dict[str, Any]] = {}
    ignored: list[tuple[str, str]] = []
    tags = [
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "PatientID",
        "StudyDate",
    ]
    for path, reason in skipped:
        rel = os.path.relpath(path, root)
        if reason.startswith(_NOT_SERIES_REASONS):
            ignored.append((rel, reason))
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags, force=True)
            uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
        except Exception:
            ignored.append((rel, reason))
            continue
        if not uid:
            ignored.append((rel, f"{reason} (no SeriesInstanceUID)"))
            continue
        group = groups.setdefault(
            uid,
            {
                "files": [],
                "reasons": set(),
                "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
                "modality": str(ds.get("Modality", "") or ""),
                "description": str(ds.get("SeriesDescription", "") or ""),
                "series_number": _int(ds.get("SeriesNumber")),
                "patient_id": str(ds.get("PatientID", "") or "").strip(),
                "study_date": str(ds.get("StudyDate", "") or "").strip(),
            },
        )
        group["files"].append(path)
        group["reasons"].add(reason)
    return groups, ignored


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def discover_records(
    root: Path,
    rules: SelectionRules,
    *,
    rank: int = 0,
    world_size: int = 1,
    specs: Sequence[ChannelSpec] = (),
    pseudonym: Callable[[str], str] | None = None,
    patient_ids: dict[str, str] | None = None,
) -> tuple[Iterator[SeriesRecord], list[tuple[str, str]], dict[str, Any]]:
    """Discover the archive and describe this rank's series for the manifest.

    Args:
        root: Archive root.
        rules: Selection rules.
        rank: This rank.
        world_size: Number of ranks (series are sharded by key hash).
        specs: The model's input channels: a selected series that does not fit them (modality,
            number of channels; :func:`medseg.infer.compat.check_header`) is skipped with the reason.
            Empty: no check.
        pseudonym: PatientID -> the pseudonym stored in the manifest (default: none stored).
        patient_ids: Filled with ``{key: PatientID}`` for a listing the user asked for; PatientIDs are
            never stored.

    Returns:
        A lazy iterator of :class:`SeriesRecord` (fingerprints computed as it is consumed), the
        ignored files ``(relative path, reason)`` and discovery statistics.
    """
    from medseg.io.dicom import scan_dicom

    t0 = time.perf_counter()
    scan = scan_dicom(root, include_localizers=True)
    extra = sorted(rules.keywords - set(_KNOWN))
    infos = [series_info(s, extra=extra) for s in scan.series]
    decisions = rules.decide_all(infos)
    non_image, ignored = _non_image_series(root, list(scan.skipped))
    notes: dict[str, list[str]] = {}
    image_uids = {s.uid for s in scan.series if s.uid}
    for uid in [u for u in non_image if u in image_uids]:
        group = non_image.pop(uid)
        notes[uid] = [
            f"discovery skipped {len(group['files'])} file(s) of this series: {'; '.join(sorted(group['reasons']))}"
        ]
    stats = {
        "discovery_s": time.perf_counter() - t0,
        "image_series": len(scan.series),
        "non_image_series": len(non_image),
        "ignored_files": len(ignored),
        "files": sum(len(s.files) for s in scan.series) + len(scan.skipped),
    }

    def records() -> Iterator[SeriesRecord]:
        for series, info in zip(scan.series, infos, strict=True):
            key = info.key
            if world_size > 1 and key_hash(key) % world_size != rank:
                continue
            decision = decisions[key]
            if decision.selected and specs:
                volumes = int(getattr(series, "num_volumes", 1) or 1)
                misfit = check_header(specs, modality=series.modality, volumes=volumes)
                if misfit is not None:
                    why = f"{decision.reason}, but does not fit the model: {misfit}"
                    decision = type(decision)(False, decision.selection, why)
            patient_id = str(getattr(series, "patient_id", "") or "")
            if patient_ids is not None:
                patient_ids[key] = patient_id
            note = "; ".join(notes.get(series.uid, []))
            try:
                files, fingerprint = fingerprint_files(root, series.files)
            except OSError as exc:
                files, fingerprint = [os.path.relpath(f, root) for f in series.files], ""
                decision = type(decision)(False, None, f"files changed during discovery ({exc.strerror})")
            yield SeriesRecord(
                key=key,
                files=files,
                fingerprint=fingerprint,
                decision=decision.selected,
                reason=decision.reason,
                selection=decision.selection,
                series_uid=series.uid,
                study_uid=str(getattr(series, "study_uid", "") or ""),
                modality=series.modality,
                description=series.description,
                series_number=getattr(series, "series_number", None),
                notes=note,
                patient=pseudonym(patient_id) if pseudonym else "",
                study_date=str(getattr(series, "study_date", "") or ""),
            )
        for uid, group in sorted(non_image.items()):
            if world_size > 1 and key_hash(uid) % world_size != rank:
                continue
            try:
                files, fingerprint = fingerprint_files(root, group["files"])
            except OSError:
                files, fingerprint = [os.path.relpath(f, root) for f in group["files"]], ""
            yield SeriesRecord(
                key=uid,
                files=files,
                fingerprint=fingerprint,
                decision=False,
                reason="not an image series: " + "; ".join(sorted(group["reasons"])),
                series_uid=uid,
                study_uid=group["study_uid"],
                modality=group["modality"],
                description=group["description"],
                series_number=group["series_number"],
                patient=pseudonym(group["patient_id"]) if pseudonym else "",
                study_date=group["study_date"],
            )
            if patient_ids is not None:
                patient_ids[uid] = group["patient_id"]

    return records(), ignored, stats


# ---------------------------------------------------------------------- naming
def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")
    slug = re.sub(r"\.{2,}", ".", slug)
    return slug[:limit].strip("._-")


def series_dir_name(*, key: str, study_uid: str, series_number: int | None, description: str) -> Path:
    """Relative output folder of a series: ``<study>/<number>-<description>-<hash>`` (sanitised)."""
    study = _slug(study_uid, 64) or "no-study-uid"
    number = f"{series_number:04d}" if isinstance(series_number, int) and series_number >= 0 else "x"
    name = f"{number}-{_slug(description, 48) or 'series'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return Path(study) / name


def _inside(out: Path, relative: Path) -> Path:
    target = (out / relative).resolve()
    if not target.is_relative_to(out.resolve()):  # defence in depth; _slug already prevents it
        raise MedsegError(f"{relative}: output path escapes the output folder")
    return target


# ---------------------------------------------------------------------- driver
@dataclass
class _Item:
    claim: Claim
    loaded: LoadedSeries | None = None
    adopt: dict[str, Any] | None = None


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Runner:
    """The driver: claims, manifest updates, commits; the per-series work is :mod:`medseg.batch.series`."""

    def __init__(
        self, root: Path, out: Path, model: Path, options: BatchOptions, manifest: Manifest, rank: int, world: int
    ):
        self.root, self.out, self.model_dir, self.options = root, out, model, options
        self.manifest, self.rank, self.world = manifest, rank, world
        from medseg.models.adapters import open_model

        self.adapter = open_model(model, folds=options.folds, checkpoint=options.checkpoint)
        self.model_id = self.adapter.fingerprint()
        self.outputs = tuple(o for o in OUTPUTS if o in options.outputs)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self.predictor: Any = None
        self.device: str | None = options.device
        self.specs, self.label_names = _model_channels(self.adapter)
        self.workers = options.workers if options.workers is not None else 0
        self.stats = {
            "processed": 0,
            "done": 0,
            "partial": 0,
            "failed": 0,
            "skipped": 0,
            "adopted": 0,
            "reused_labels": 0,
        }
        self.bar: Any = None
        self.total = 0
        self.stage: str | None = None
        self.interrupted = False
        self._log_lines = False

    # ---------------------------------------------------------------- claims
    def _claim(self) -> Claim | None:
        if self._stop.is_set():
            return None
        claim = self.manifest.claim(rank=self.rank, world_size=self.world, lease_s=self.options.lease_s)
        if claim is not None:
            with self._held_lock:
                self._held.add(claim.claim_id)
            _crash_point("claimed")
        return claim

    def _drop(self, claim: Claim) -> None:
        with self._held_lock:
            self._held.discard(claim.claim_id)

    def _heartbeat(self) -> None:
        interval = max(1.0, self.options.lease_s / 3)
        while not self._stop.wait(interval):
            with self._held_lock:
                ids = list(self._held)
            with contextlib.suppress(Exception):
                self.manifest.renew(ids, lease_s=self.options.lease_s)

    def _predictor(self) -> Any:
        """The predictor, built on first use (a run that only carries outputs over never loads the network)."""
        if self.predictor is None:
            self.predictor = _make_predictor(self.adapter, self.device, self.options.infer)
        return self.predictor

    # ---------------------------------------------------------------- stages
    def final_dir(self, claim: Claim) -> Path:
        relative = series_dir_name(
            key=claim.key, study_uid=claim.study_uid, series_number=claim.series_number, description=claim.description
        )
        return _inside(self.out, relative)

    def _adoptable(self, claim: Claim) -> dict[str, Any] | None:
        """The marker of an output folder completed by a run killed before it could record it."""
        marker = self.final_dir(claim) / MARKER
        try:
            data = json.loads(marker.read_text())
        except (OSError, ValueError):
            return None
        status = data.get("output_status") or {kind: {"files": []} for kind in data.get("outputs", [])}
        same = (
            data.get("key") == claim.key
            and data.get("fingerprint") == claim.fingerprint
            and data.get("model_id") == self.model_id
            and set(self.outputs) <= set(status)
            and all((marker.parent / name).is_file() for name in data.get("files", []))
        )
        if not same:
            return None
        recorded = claim.previous.get("output_status") or {}
        if recorded == status and claim.previous.get("done_fingerprint") == claim.fingerprint:
            return None  # already recorded as it is: this is a retry, not an interrupted commit
        return {**data, "output_status": status}

    def task(self, claim: Claim) -> SeriesTask:
        """What to do for a claimed series: the requested outputs, and what an earlier result lets us keep."""
        task = SeriesTask(
            key=claim.key,
            files=list(claim.files),
            series_uid=claim.series_uid,
            study_uid=claim.study_uid,
            modality=claim.modality,
            description=claim.description,
            label=claim.label,
            outputs=self.outputs,
        )
        previous = claim.previous
        if not (claim.out_dir and previous.get("model_id") == self.model_id):
            return task
        if previous.get("done_fingerprint") != claim.fingerprint:
            return task
        folder = _inside(self.out, Path(claim.out_dir))
        if not (folder / MARKER).is_file():
            return task
        kept = {
            kind: entry
            for kind, entry in (previous.get("output_status") or {}).items()
            if entry.get("files") and all((folder / str(n)).is_file() for n in entry["files"])
        }
        if not kept:
            return task
        task.carry_dir, task.carry = folder, kept
        if "nifti" in kept:
            task.labels_from = str(kept["nifti"]["files"][0])
        return task

    def _set_stage(self, claim: Claim, stage: str) -> None:
        self.stage = stage
        self.manifest.set_stage(claim, stage)

    def load(self, claim: Claim) -> _Item:
        item = _Item(claim)
        try:
            adopted = self._adoptable(claim)
        except MedsegError:
            adopted = None
        if adopted is not None:
            item.adopt = adopted
            return item
        item.loaded = load_task(
            self.root,
            self.task(claim),
            specs=self.specs,
            compat_check=self.options.compat_check,
            on_stage=lambda stage: self.manifest.set_stage(claim, stage),
        )
        if item.loaded.error is None and item.loaded.skip is None:
            _crash_point("loaded")
        return item

    def process(self, item: _Item) -> None:
        claim = item.claim
        self.stats["processed"] += 1
        outcome = "failed"
        if self.bar is not None:
            self.bar.set_description_str(_short(claim), refresh=True)
        try:
            outcome = self._process(item)
        except KeyboardInterrupt:
            self.manifest.release(claim, why="interrupted (Ctrl-C)")
            outcome = "interrupted"
            raise
        finally:
            self.stage = None
            self._drop(claim)
            item.loaded = None
            self._report(item, outcome)

    def _process(self, item: _Item) -> str:
        claim = item.claim
        if item.adopt is not None:
            final = self.final_dir(claim)
            status = item.adopt["output_status"]
            ok = self.manifest.complete(
                claim,
                out_dir=str(final.relative_to(self.out.resolve())),
                outputs=[k for k, v in status.items() if "files" in v],
                model_id=self.model_id,
                timings=item.adopt.get("timings"),
                detail="adopted outputs completed by an interrupted run",
                output_status=status,
            )
            self.stats["adopted"] += ok
            outcome = "partial" if any("error" in v for v in status.values()) else "done"
            self.stats[outcome] += ok
            return outcome if ok else "lost"
        loaded = item.loaded
        assert loaded is not None
        if loaded.error is not None:
            self._fail(item, loaded.error, timings={"load_s": round(loaded.load_s, 4)})
            return "failed"
        if loaded.skip is not None:
            reason = f"does not fit the model: {loaded.skip}"
            if self.manifest.skip(claim, redact(reason, loaded.terms, root=self.root), model_id=self.model_id):
                self.stats["skipped"] += 1
            return "skipped"
        tmp = _inside(self.out, Path(_TMP) / claim.claim_id)
        try:
            return self._predict_and_write(item, tmp)
        except MedsegError as exc:
            self._fail(item, self._clean(str(exc), tmp, claim), timings={"load_s": round(loaded.load_s, 4)})
        except Exception as exc:
            message = self._clean(f"unexpected {type(exc).__name__}: {exc}", tmp, claim)
            self._fail(item, message, timings={"load_s": round(loaded.load_s, 4)})
        return "failed"

    def _clean(self, text: str, tmp: Path, claim: Claim) -> str:
        """Name the series' final folder instead of the temporary one (which is gone by the time anyone reads it)."""
        final = str(self.final_dir(claim).relative_to(self.out.resolve()))
        return text.replace(str(tmp), final)

    def _fail(self, item: _Item, error: str, *, timings: dict[str, float] | None = None) -> None:
        terms = item.loaded.terms if item.loaded is not None else []
        message = redact(error, terms, root=self.root)
        if self.manifest.fail(item.claim, message, timings=timings):
            self.stats["failed"] += 1

    def _predict_and_write(self, item: _Item, tmp: Path) -> str:
        claim, loaded = item.claim, item.loaded
        assert loaded is not None and loaded.volume is not None
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            result = run_task(
                loaded,
                self._predictor,
                tmp,
                label_names=self.label_names,
                seg_type=self.options.seg_type,
                report={
                    "key": claim.key,
                    "series_uid": claim.series_uid,
                    "study_uid": claim.study_uid,
                    "modality": claim.modality,
                    "series_description": claim.description,
                    "model": str(self.model_dir),
                    "model_id": self.model_id,
                },
                on_stage=lambda stage: self._set_stage(claim, stage),
                after_predict=lambda: _crash_point("predicted"),
            )
            self.stats["reused_labels"] += result.reused_labels
            if not result.written:  # nothing at all could be written: the series failed
                raise MedsegError("; ".join(f"{kind}: {why}" for kind, why in result.failed.items()))
            self.stage = "committing"
            terms = loaded.terms
            status = {
                kind: ({"error": redact(self._clean(entry["error"], tmp, claim), terms, root=self.root)}
                       if "error" in entry else entry)
                for kind, entry in result.status().items()
            }  # fmt: skip
            timings = {**result.timings, "total_s": round(time.perf_counter() - t0 + loaded.load_s, 4)}
            final = self.final_dir(claim)
            marker = {
                "key": claim.key,
                "series_uid": claim.series_uid,
                "study_uid": claim.study_uid,
                "fingerprint": claim.fingerprint,
                "model_id": self.model_id,
                "outputs": result.written,
                "output_status": status,
                "files": result.files,
                "timings": timings,
                "claim_id": claim.claim_id,
                "completed_at": time.time(),
            }
            write_json_atomic(tmp / MARKER, marker)
            _crash_point("outputs_written")
            ok = self.manifest.complete(
                claim,
                out_dir=str(final.relative_to(self.out.resolve())),
                outputs=result.written,
                model_id=self.model_id,
                timings=timings,
                commit=lambda: self._commit_dir(tmp, final, claim),
                output_status=status,
            )
            if not ok:
                raise MedsegError(
                    f"series {claim.label}: claim lost to another process (lease expired); outputs discarded"
                )
            _crash_point("committed")
            outcome = "partial" if result.failed else "done"
            self.stats[outcome] += 1
            return outcome
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit_dir(self, tmp: Path, final: Path, claim: Claim) -> None:
        """Rename the finished temp folder into place (replacing an older result); called under the DB lock."""
        final.parent.mkdir(parents=True, exist_ok=True)
        trash: Path | None = None
        if final.exists():
            trash = _inside(self.out, Path(_TMP) / f"trash-{claim.claim_id}")
            os.replace(final, trash)
        os.replace(tmp, final)
        _crash_point("renamed")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # -------------------------------------------------------------- reporting
    def _report(self, item: _Item, outcome: str) -> None:
        """Progress: the bar on a terminal, one plain line per series otherwise (no escape codes in logs)."""
        claim = item.claim
        detail = ""
        if outcome in ("failed", "partial", "skipped"):
            row = self.manifest.row(claim.key)
            if row is not None:
                detail = str((row["reason"] if outcome == "skipped" else row["error"]) or "")
        line = f"{outcome}: {claim.label}" + (f": {detail}" if detail else "")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                done=self.stats["done"], partial=self.stats["partial"], failed=self.stats["failed"], refresh=False
            )
            if outcome in ("failed", "partial"):
                self.bar.write(line, file=sys.stderr)
        elif self._log_lines:
            count = self.stats["processed"]
            print(f"medseg batch [{count}/{self.total}] {line}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------- loop
    def verify_done(self) -> list[str]:
        """Send ``done``/``partial`` series whose output folder has gone missing back to ``pending``."""
        rows = [
            *self.manifest.rows("done", rank=self.rank, world_size=self.world),
            *self.manifest.rows("partial", rank=self.rank, world_size=self.world),
        ]
        lost = [row["key"] for row in rows if not (row["out_dir"] and (self.out / row["out_dir"] / MARKER).is_file())]
        for key in lost:
            self.manifest.reset(key, "outputs of a done series are missing")
        return lost

    def cleanup_tmp(self) -> None:
        """Remove temp folders whose claim is no longer running (left by killed processes)."""
        tmp_root = self.out / _TMP
        if not tmp_root.is_dir():
            return
        live = self.manifest.running_claim_ids()
        for entry in tmp_root.iterdir():
            claim_id = entry.name.removeprefix("trash-")
            if claim_id not in live:
                shutil.rmtree(entry, ignore_errors=True)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """SIGINT handler: stop claiming and finish or release the current series.

        The first Ctrl-C lets a series being written finish; one being loaded or predicted is released
        at once (it goes back to pending).  A second Ctrl-C interrupts whatever runs.
        """
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        self._stop.set()
        if self.stage in ("writing", "committing"):
            print(
                "\nmedseg batch: interrupted - finishing the series being written (Ctrl-C again to abort it)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise KeyboardInterrupt

    def run(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.total = total
        tty = _is_tty(sys.stderr)
        self._log_lines = self.options.progress and not tty
        if self.options.progress and tty:
            self.bar = tqdm(
                total=total,
                unit="series",
                desc="batch" if self.world == 1 else f"batch rank {self.rank}",
                dynamic_ncols=True,
            )
        heartbeat = threading.Thread(target=self._heartbeat, name="medseg-batch-heartbeat", daemon=True)
        heartbeat.start()
        previous_handler: Any = None
        if (
            self.options.handle_sigint
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            if self.workers == 0:
                while (claim := self._claim()) is not None:
                    self.process(self.load(claim))
            else:
                self._run_prefetch()
        except KeyboardInterrupt:
            self.interrupted = True
            if not self.options.handle_sigint:
                raise  # the caller handles interruptions (claims are released below)
        finally:
            self._stop.set()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
            if self.interrupted:  # a claim taken or loaded when Ctrl-C came goes back to pending
                self.manifest.release_owned(why="interrupted (Ctrl-C)")
            heartbeat.join(timeout=30)
            if self.bar is not None:
                self.bar.close()

    def _run_prefetch(self) -> None:
        slots: queue.Queue[_Item | None] = queue.Queue(maxsize=self.options.prefetch)

        def loader() -> None:
            try:
                while not self._stop.is_set():
                    claim = self._claim()
                    if claim is None:
                        break
                    item = self.load(claim)
                    while True:
                        try:
                            slots.put(item, timeout=0.5)
                            break
                        except queue.Full:
                            if self._stop.is_set():
                                self.manifest.release(claim)
                                self._drop(claim)
                                return
            finally:
                with contextlib.suppress(Exception):
                    slots.put(None, timeout=3600)

        threads = [
            threading.Thread(target=loader, name=f"medseg-batch-loader-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in threads:
            thread.start()
        finished = 0
        try:
            while finished < len(threads):
                item = slots.get()
                if item is None:
                    finished += 1
                    continue
                if self._stop.is_set():  # interrupted: give back what was loaded but not processed
                    self.manifest.release(item.claim)
                    self._drop(item.claim)
                    continue
                self.process(item)
            for thread in threads:
                thread.join()
        except BaseException:
            self._stop.set()
            self._release_queued(slots)  # give back what was loaded but not processed ...
            for thread in threads:
                thread.join(timeout=60)
            self._release_queued(slots)  # ... including what the loaders put in while stopping
            raise

    def _release_queued(self, slots: queue.Queue[_Item | None]) -> None:
        while True:
            try:
                pending = slots.get_nowait()
            except queue.Empty:
                return
            if pending is not None:
                self.manifest.release(pending.claim)


def _short(claim: Claim, limit: int = 60) -> str:
    """The progress bar's name of a series: ``P3c9a1e 2019-03-04 #7 T1 post`` (pseudonym, never the ID)."""
    date = claim.study_date
    if len(date) == 8 and date.isdigit():
        date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
    number = f"#{claim.series_number}" if claim.series_number is not None else ""
    label = " ".join(p for p in (claim.patient, date, number, claim.description) if p) or claim.key
    return label if len(label) <= limit else label[: limit - 1] + "…"


_SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "zscore-foreground": "zscore"}


def _model_channels(adapter: Any) -> tuple[list[ChannelSpec], dict[int, str]]:
    """The model's input channels (for the compatibility check) and label names, from the model seam."""
    specs = []
    for c in adapter.channels:
        scheme = _SCHEMES.get(c.normalization, c.normalization if c.normalization in ("ct", "zscore") else "none")
        specs.append(ChannelSpec(name=c.name, modality=expected_modality(c.name, scheme), scheme=scheme))
    return specs, {int(k): str(v) for k, v in adapter.label_names.items()}


def _make_predictor(adapter: Any, device: str | None, overrides: dict[str, Any] | None = None) -> Any:
    from medseg.config import InferConfig
    from medseg.infer.predictor import Predictor

    update = {**(overrides or {}), **({"device": device} if device is not None else {})}
    infer = InferConfig.model_validate({**adapter.infer_defaults.model_dump(), **update})
    return Predictor(adapter, infer=infer)


def series_listing(out_dir: PathLike, *, patient_ids: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every series of a manifest for the user: patient, study date, series number, description, state, reason.

    Args:
        out_dir: The batch output folder.
        patient_ids: ``{key: PatientID}`` to show instead of the stored pseudonyms (``--show-patient-ids``).

    Returns:
        Rows sorted by patient, study date and series number; ``selected`` tells the rules' (and the model
        check's) decision, ``reason`` why (plus the error of a failed series).
    """
    with Manifest(Path(out_dir) / "manifest.sqlite") as manifest:
        rows = manifest.rows()
    listing = []
    for row in rows:
        date = str(row["study_date"] or "")
        if len(date) == 8 and date.isdigit():
            date = f"{date[:4]}-{date[4:6]}-{date[6:]}"
        reason = str(row["reason"] or "")
        if row["error"]:
            reason += f"; {row['state']}: {row['error']}"
        listing.append(
            {
                "key": row["key"],
                "selected": row["decision"] == "selected" and row["state"] != "skipped",
                "state": row["state"],
                "patient": (patient_ids or {}).get(row["key"], "") if patient_ids is not None else row["patient"],
                "study_date": date,
                "series_number": row["series_number"],
                "modality": row["modality"],
                "description": row["description"],
                "images": row["num_files"],
                "reason": reason,
                "out_dir": row["out_dir"],
            }
        )
    listing.sort(key=lambda r: (str(r["patient"]), r["study_date"], r["series_number"] or 0, r["key"]))
    return listing


def run_batch(
    input_root: PathLike,
    model: PathLike,
    out_dir: PathLike,
    options: BatchOptions | None = None,
    *,
    patient_ids: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Segment every eligible series of a DICOM archive, resumably (see the module docstring).

    Args:
        input_root: Archive folder (searched recursively).
        model: Model (medseg model directory or nnU-Net folder, see :func:`medseg.models.adapters.open_model`).
        out_dir: Output folder (created); holds the manifest and one folder per series.
        options: Run settings.
        patient_ids: Filled with ``{series key: PatientID}`` by discovery, for a listing the user
            asked for (``--show-patient-ids``); never stored.

    Returns:
        The summary (also written to ``OUT/summary.json`` once nothing is pending or running);
        ``summary["run"]["interrupted"]`` is true after a Ctrl-C.

    Raises:
        InputError: The input root does not exist.
        ConfigError: Invalid options or rules.
        ModelError: The model cannot be loaded.
    """
    options = options or BatchOptions()
    options.validate()
    wall0 = time.perf_counter()
    root = Path(input_root).resolve()
    out = Path(out_dir).resolve()
    if not root.is_dir():
        raise InputError(root, "no such folder" if not root.exists() else "not a folder")
    if out == root or out.is_relative_to(root):
        raise ConfigError(f"{out}: the output folder must not be inside the input archive {root}")
    rank, world, local_rank, local_world = distributed_env(options.rank, options.world_size)
    rules = load_rules(options.rules)
    out.mkdir(parents=True, exist_ok=True)
    journal = options.journal_mode or os.environ.get("MEDSEG_BATCH_JOURNAL", "WAL")
    device = options.device
    if device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    if world > 1 and (device is None or device.startswith("cpu")):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    with warnings.catch_warnings(), Manifest(out / "manifest.sqlite", journal_mode=journal) as manifest:
        # Library warnings can quote header values (patient names): keep them out of the logs.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")
        runner = _Runner(root, out, Path(model), options, manifest, rank, world)
        runner.device = device
        discovery: dict[str, Any] = {}
        if options.discover:
            records, ignored, discovery = discover_records(
                root,
                rules,
                rank=rank,
                world_size=world,
                specs=runner.specs if options.compat_check else (),
                pseudonym=manifest.pseudonym,
                patient_ids=patient_ids,
            )
            sync = manifest.sync(
                records,
                model_id=runner.model_id,
                outputs=runner.outputs,
                retry_failed=options.retry_failed,
                compat_check=options.compat_check,
            )
            if rank == 0:
                manifest.add_ignored(ignored)
            discovery["sync"] = vars(sync)
            discovery["discovery_and_sync_s"] = time.perf_counter() - wall0
        elif options.retry_failed:
            raise ConfigError("--retry-failed needs discovery (drop --no-discovery)")
        reclaimed = manifest.reclaim(rank=rank, world_size=world, max_attempts=options.max_attempts)
        runner.cleanup_tmp()
        lost = runner.verify_done()
        t_process = time.perf_counter()
        if options.process:
            total = manifest.count("pending", rank=rank, world_size=world)
            if total:
                runner._predictor()  # fail fast on a model that cannot be loaded
                if options.workers is None:
                    runner.workers = 2 if getattr(runner.predictor.device, "type", "cpu") == "cuda" else 0
            runner.run(total)
        process_s = time.perf_counter() - t_process
        summary = manifest.summary()
        summary["run"] = {
            "input": str(root),
            "out": str(out),
            "model": str(Path(model).resolve()),
            "model_id": runner.model_id,
            "outputs": list(runner.outputs),
            "rules": rules.source,
            "rank": rank,
            "world_size": world,
            "workers": runner.workers,
            "prefetch": options.prefetch,
            "journal_mode": manifest.journal_mode,
            "reclaimed": len(reclaimed),
            "outputs_missing": len(lost),
            **{k: v for k, v in discovery.items()},
            **runner.stats,
            "interrupted": runner.interrupted,
            "compat_check": options.compat_check,
            "process_s": round(process_s, 3),
            "series_per_s": round(runner.stats["processed"] / process_s, 4) if process_s > 0 else None,
            "wall_s": round(time.perf_counter() - wall0, 3),
        }
    if world > 1:
        write_json_atomic(out / f"summary.rank{rank}.json", summary)
    if summary["complete"] or world == 1:
        write_json_atomic(out / "summary.json", summary)
    return summary
