"""Batch inference over a DICOM archive: discover, select, predict, write, record.

One call of :func:`run_batch` (one ``medseg batch`` process, or one torchrun rank):

1. **Discovery** (headers only, :func:`medseg.io.dicom.scan_dicom`) groups the archive into
   series; every series gets a decision from the selection rules and is streamed into the
   manifest (:mod:`medseg.batch.manifest`) with its input fingerprint.  Non-image objects
   (SR, RTSTRUCT, SEG, ...) become skipped series with the reason; non-DICOM and unreadable
   files are recorded as ignored.
2. **Recovery**: ``running`` rows left by dead processes go back to ``pending``; temporary
   output folders of dead claims are removed.
3. **Processing**: loader threads claim series atomically and read/decode them into a bounded
   queue (``workers`` threads, ``prefetch`` slots) while the main thread predicts and writes the
   previous one, so at most ``workers + prefetch + 1`` volumes are in memory whatever the
   archive size.  All outputs of a series are written into ``OUT/.tmp/<claim>/`` and renamed to
   their final folder inside the manifest transaction that marks the series ``done``.  A series
   that fails is recorded with its (redacted) reason and the run continues.
4. **Summary**: counts per state, failures with reasons, as ``summary.json`` and returned.

Output layout (names from DICOM attributes are sanitised; nothing can escape ``OUT``)::

    OUT/manifest.sqlite               the manifest (+ -wal/-shm while in use)
    OUT/summary.json                  written when no series is pending or running
    OUT/<StudyInstanceUID>/<SeriesNumber>-<SeriesDescription>-<hash of key>/
        segmentation.nii.gz (+ .json)  label volume on the input grid (``nifti``)
        seg.dcm                        DICOM SEG (``seg``)
        rtstruct.dcm                   RTSTRUCT (``rtstruct``)
        volumes.json                   volume per class in mL (``json``)
        .medseg-series.json            completion marker (key, input fingerprint, model)

Scale-out: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every rank discovers the archive,
keeps the series whose stable key hash falls in its shard (``hash % WORLD_SIZE == RANK``) and
claims them in the shared manifest; see :mod:`medseg.batch.manifest` for the filesystem limits.

Patient names and IDs are never printed or stored in messages: errors are redacted with the
identifying values of the series' own header before they reach the log or the manifest.
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
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from medseg.batch.manifest import Claim, Manifest, SeriesRecord, fingerprint_files, key_hash
from medseg.batch.selection import IDENTIFYING, SelectionRules, SeriesInfo, load_rules, plane_of
from medseg.errors import ConfigError, InputError, MedsegError
from medseg.io.images import write_json_atomic, write_volume
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = [
    "OUTPUTS",
    "BatchOptions",
    "discover_records",
    "distributed_env",
    "model_fingerprint",
    "run_batch",
    "series_dir_name",
]

OUTPUTS = ("nifti", "seg", "rtstruct", "json")
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
    tags = ["SeriesInstanceUID", "StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber"]
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
    root: Path, rules: SelectionRules, *, rank: int = 0, world_size: int = 1
) -> tuple[Iterator[SeriesRecord], list[tuple[str, str]], dict[str, Any]]:
    """Discover the archive and describe this rank's series for the manifest.

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
            )

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


# --------------------------------------------------------------------- loading
def _phi_terms(path: Path) -> list[str]:
    """Identifying strings of a series (patient name and its parts, IDs, birth date) for redaction."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=sorted(IDENTIFYING), force=True)
    except Exception:
        return []
    terms: set[str] = set()
    for keyword in IDENTIFYING:
        value = ds.get(keyword)
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for item in values:
            text = str(item).strip()
            if len(text) >= 3:
                terms.add(text)
            for part in re.split(r"[\^=\s,]+", text):
                if len(part) >= 3:
                    terms.add(part)
    return sorted(terms, key=len, reverse=True)


def redact(text: str, terms: Sequence[str], *, root: Path | None = None) -> str:
    """Replace identifying ``terms`` (case-insensitive) and the input root prefix in ``text``."""
    if root is not None:
        text = text.replace(str(root) + os.sep, "")
    for term in terms:
        text = re.sub(re.escape(term), "<redacted>", text, flags=re.IGNORECASE)
    return text


def _single_folder(paths: list[Path]) -> Path | None:
    """The folder holding exactly these files (recursively), or None."""
    parents = {p.parent for p in paths}
    if len(parents) != 1:
        return None
    folder = parents.pop()
    count = 0
    for _, _, names in os.walk(folder):
        count += len(names)
        if count > len(paths):
            return None
    return folder if count == len(paths) else None


def load_claimed_series(root: Path, claim: Claim) -> Volume:
    """Read the claimed series (only its own files; no other series of the archive are scanned).

    Raises:
        InputError: The series cannot be found again or loaded.
    """
    from medseg.io.dicom import load_series, scan_dicom

    paths = [root / f for f in claim.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(missing[0], f"file of series {claim.key} vanished since discovery")
    folder = _single_folder(paths)
    links: Path | None = None
    with contextlib.ExitStack() as stack:
        if folder is None:  # the series shares folders with other files: scan links to its own files
            folder = links = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medseg-batch-")))
            for index, path in enumerate(paths):
                os.symlink(path, folder / f"{index:06d}")
        try:
            scan = scan_dicom(folder, include_localizers=True)
            candidates = [s for s in scan.series if s.key == claim.key]
            candidates = candidates or (scan.series if len(scan.series) == 1 else [])
            if len(candidates) != 1:
                raise InputError(
                    paths[0], f"series {claim.key} not found again in its files (changed since discovery?)"
                )
            return load_series(candidates[0], source=paths[0].parent)
        except MedsegError as exc:
            if links is None:
                raise
            message = re.sub(re.escape(str(links)) + r"/(\d{6})", lambda m: str(paths[int(m.group(1))]), str(exc))
            raise MedsegError(message.replace(str(links), str(paths[0].parent))) from exc


# ---------------------------------------------------------------------- writing
def _volumes_ml(label: Volume, names: dict[int, str]) -> dict[str, dict[str, Any]]:
    voxel_ml = abs(float(np.linalg.det(label.geometry.affine[:3, :3]))) / 1000.0
    counts = np.bincount(np.asarray(label.array).ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    out: dict[str, dict[str, Any]] = {}
    for value in range(1, len(counts)):
        name = names.get(value, f"label {value}")
        out[name] = {
            "label": value,
            "voxels": int(counts[value]),
            "volume_ml": round(float(counts[value]) * voxel_ml, 4),
        }
    return out


def _source_headers(root: Path, claim: Claim, volume: Volume) -> list[Any]:
    """Headers of the slices the volume was built from (duplicates dropped), for SEG/RTSTRUCT."""
    import pydicom

    kept = [str(u) for u in volume.meta.get("sop_instance_uids", [])]
    wanted = set(kept)
    headers: dict[str, Any] = {}
    for rel in claim.files:
        ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if (not wanted or uid in wanted) and uid not in headers:
            headers[uid] = ds
    return list(headers.values())


def _write_rtstruct(
    label: Volume, image: Volume, sources: list[Any], path: Path, names: dict[int, str], description: str
) -> None:
    """RTSTRUCT through :func:`medseg.io.rtstruct.labels_to_rtstruct`, referencing the loaded series."""
    from medseg.io.rtstruct import ReferenceSeries, labels_to_rtstruct

    if not sources:
        raise MedsegError(f"{path}: no source headers to reference")
    header = sources[0]
    sop_class = str(header.get("SOPClassUID", "") or "")
    if not sop_class and getattr(header, "file_meta", None) is not None:
        sop_class = str(header.file_meta.get("MediaStorageSOPClassUID", "") or "")
    reference = ReferenceSeries(
        folder=Path(str(getattr(header, "filename", "") or ".")).parent,
        image=image,
        header=header,
        sop_class_uid=sop_class,
        frame_of_reference_uid=str(header.get("FrameOfReferenceUID", "") or ""),
    )
    labels_to_rtstruct(
        label,
        reference,
        path,
        label_names={k: v for k, v in names.items() if k != 0},
        series_description=description,
        include_empty=True,  # every class, in model order, even without contours (an empty set is invalid DICOM)
    )


@dataclass
class _Item:
    claim: Claim
    volume: Volume | None = None
    error: str | None = None
    adopt: dict[str, Any] | None = None
    terms: list[str] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)
    load_s: float = 0.0


class _Runner:
    def __init__(
        self, root: Path, out: Path, model: Path, options: BatchOptions, manifest: Manifest, rank: int, world: int
    ):
        self.root, self.out, self.model_dir, self.options = root, out, model, options
        self.manifest, self.rank, self.world = manifest, rank, world
        self.model_id = model_fingerprint(model, folds=options.folds, checkpoint=options.checkpoint)
        self.outputs = tuple(o for o in OUTPUTS if o in options.outputs)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self.predictor: Any = None
        self.workers = options.workers if options.workers is not None else 0
        self.stats = {"processed": 0, "done": 0, "failed": 0, "adopted": 0}
        self.bar: Any = None

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
        same = (
            data.get("key") == claim.key
            and data.get("fingerprint") == claim.fingerprint
            and data.get("model_id") == self.model_id
            and set(self.outputs) <= set(data.get("outputs", []))
            and all((marker.parent / name).is_file() for name in data.get("files", []))
        )
        return data if same else None

    def load(self, claim: Claim) -> _Item:
        t0 = time.perf_counter()
        item = _Item(claim)
        try:
            self.manifest.set_stage(claim, "loading")
            first = self.root / claim.files[0] if claim.files else self.root
            item.terms = _phi_terms(first) if claim.files else []
            adopted = self._adoptable(claim)
            if adopted is not None:
                item.adopt = adopted
                return item
            if {"seg", "rtstruct"} & set(self.outputs) and not (claim.series_uid and claim.study_uid):
                raise InputError(
                    first,
                    "empty SeriesInstanceUID/StudyInstanceUID (anonymised by blanking UIDs?): DICOM SEG/RTSTRUCT"
                    " outputs must reference the source by UID; run with --outputs nifti,json for this series",
                )
            item.volume = load_claimed_series(self.root, claim)
            if {"seg", "rtstruct"} & set(self.outputs):
                item.sources = _source_headers(self.root, claim, item.volume)
            _crash_point("loaded")
        except MedsegError as exc:
            item.error = str(exc)
        except Exception as exc:  # a bad case must not stop the batch
            item.error = f"unexpected {type(exc).__name__} while loading: {exc}"
        item.load_s = time.perf_counter() - t0
        return item

    def process(self, item: _Item) -> None:
        claim = item.claim
        self.stats["processed"] += 1
        try:
            if item.error is not None:
                self._fail(item, item.error)
                return
            if item.adopt is not None:
                final = self.final_dir(claim)
                ok = self.manifest.complete(
                    claim,
                    out_dir=str(final.relative_to(self.out.resolve())),
                    outputs=item.adopt.get("outputs", self.outputs),
                    model_id=self.model_id,
                    timings=item.adopt.get("timings"),
                    detail="adopted outputs completed by an interrupted run",
                )
                self.stats["adopted"] += ok
                self.stats["done"] += ok
                return
            try:
                timings = self._predict_and_write(item)
            except MedsegError as exc:
                self._fail(item, str(exc), timings={"load_s": item.load_s})
            except Exception as exc:
                self._fail(item, f"unexpected {type(exc).__name__}: {exc}", timings={"load_s": item.load_s})
            else:
                self.stats["done"] += 1
                del timings
        except KeyboardInterrupt:
            self.manifest.release(claim)
            raise
        finally:
            self._drop(claim)
            item.volume = None
            item.sources = []
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(done=self.stats["done"], failed=self.stats["failed"], refresh=False)

    def _fail(self, item: _Item, error: str, *, timings: dict[str, float] | None = None) -> None:
        message = redact(error, item.terms, root=self.root)
        if self.manifest.fail(item.claim, message, timings=timings):
            self.stats["failed"] += 1
            if self.bar is not None:
                self.bar.write(f"failed: {item.claim.key}: {message}")

    def _predict_and_write(self, item: _Item) -> dict[str, float]:
        claim, volume = item.claim, item.volume
        assert volume is not None
        self.manifest.set_stage(claim, "infer")
        t0 = time.perf_counter()
        label = self.predictor.predict([volume])
        _crash_point("predicted")
        t1 = time.perf_counter()
        self.manifest.set_stage(claim, "writing")
        names = {int(k): str(v) for k, v in self.predictor.label_names.items()}
        tmp = _inside(self.out, Path(_TMP) / claim.claim_id)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files = self._write_outputs(tmp, item, label, names)
            t2 = time.perf_counter()
            timings = {
                "load_s": round(item.load_s, 4),
                "infer_s": round(t1 - t0, 4),
                "write_s": round(t2 - t1, 4),
                **{k: round(float(v), 4) for k, v in (getattr(self.predictor, "last_timings", {}) or {}).items()},
            }
            final = self.final_dir(claim)
            marker = {
                "key": claim.key,
                "series_uid": claim.series_uid,
                "study_uid": claim.study_uid,
                "fingerprint": claim.fingerprint,
                "model_id": self.model_id,
                "outputs": list(self.outputs),
                "files": files,
                "timings": timings,
                "claim_id": claim.claim_id,
                "completed_at": time.time(),
            }
            write_json_atomic(tmp / MARKER, marker)
            _crash_point("outputs_written")
            ok = self.manifest.complete(
                claim,
                out_dir=str(final.relative_to(self.out.resolve())),
                outputs=self.outputs,
                model_id=self.model_id,
                timings=timings,
                commit=lambda: self._commit_dir(tmp, final, claim),
            )
            if not ok:
                raise MedsegError(
                    f"series {claim.key}: claim lost to another process (lease expired); outputs discarded"
                )
            _crash_point("committed")
            return timings
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _write_outputs(self, tmp: Path, item: _Item, label: Volume, names: dict[int, str]) -> list[str]:
        claim, volume = item.claim, item.volume
        assert volume is not None
        files: list[str] = []
        label.meta.setdefault("series_uid", claim.series_uid)
        if "nifti" in self.outputs:
            write_volume(label, tmp / "segmentation.nii.gz", label_names=names)
            files += ["segmentation.nii.gz", "segmentation.json"]
        sources = item.sources
        if "seg" in self.outputs:
            from medseg.io.dicom_seg import write_dicom_seg

            write_dicom_seg(
                label,
                sources,
                tmp / "seg.dcm",
                label_names=names,
                segmentation_type=self.options.seg_type,
                series_description=f"medseg SEG {claim.description}".strip()[:64],
            )
            files.append("seg.dcm")
        if "rtstruct" in self.outputs:
            _write_rtstruct(
                label, volume, sources, tmp / "rtstruct.dcm", names, f"medseg RTSTRUCT {claim.description}".strip()[:64]
            )
            files.append("rtstruct.dcm")
        if "json" in self.outputs:
            report = {
                "key": claim.key,
                "series_uid": claim.series_uid,
                "study_uid": claim.study_uid,
                "modality": claim.modality,
                "series_description": claim.description,
                "model": str(self.model_dir),
                "model_id": self.model_id,
                "geometry": label.geometry.to_dict(),
                "voxel_volume_ml": abs(float(np.linalg.det(label.geometry.affine[:3, :3]))) / 1000.0,
                "classes": _volumes_ml(label, names),
            }
            write_json_atomic(tmp / "volumes.json", report)
            files.append("volumes.json")
        return files

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

    # ------------------------------------------------------------------- loop
    def verify_done(self) -> list[str]:
        """Send ``done`` series whose output folder has gone missing back to ``pending``."""
        lost = [
            row["key"]
            for row in self.manifest.rows("done", rank=self.rank, world_size=self.world)
            if not (row["out_dir"] and (self.out / row["out_dir"] / MARKER).is_file())
        ]
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

    def run(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            unit="series",
            desc="batch" if self.world == 1 else f"batch rank {self.rank}",
            disable=not self.options.progress,
            dynamic_ncols=True,
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="medseg-batch-heartbeat", daemon=True)
        heartbeat.start()
        try:
            if self.workers == 0:
                while (claim := self._claim()) is not None:
                    self.process(self.load(claim))
            else:
                self._run_prefetch()
        finally:
            self._stop.set()
            heartbeat.join(timeout=30)
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
                self.process(item)
            for thread in threads:
                thread.join()
        except BaseException:
            self._stop.set()
            while True:  # give back what was loaded but not processed
                try:
                    pending = slots.get_nowait()
                except queue.Empty:
                    break
                if pending is not None:
                    self.manifest.release(pending.claim)
            raise


def _make_predictor(model: Path, device: str | None, options: BatchOptions | None = None) -> Any:
    from medseg.infer.predictor import Predictor
    from medseg.models.adapters import open_model

    options = options or BatchOptions()
    adapter = open_model(model, folds=options.folds, checkpoint=options.checkpoint)
    infer = adapter.infer_defaults
    if device is not None:
        infer = infer.model_copy(update={"device": device})
    return Predictor(adapter, infer=infer)


def run_batch(
    input_root: PathLike,
    model: PathLike,
    out_dir: PathLike,
    options: BatchOptions | None = None,
) -> dict[str, Any]:
    """Segment every eligible series of a DICOM archive, resumably (see the module docstring).

    Args:
        input_root: Archive folder (searched recursively).
        model: Model (medseg model directory or nnU-Net folder, see :func:`medseg.models.adapters.open_model`).
        out_dir: Output folder (created); holds the manifest and one folder per series.
        options: Run settings.

    Returns:
        The summary (also written to ``OUT/summary.json`` once nothing is pending or running).

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
        discovery: dict[str, Any] = {}
        if options.discover:
            records, ignored, discovery = discover_records(root, rules, rank=rank, world_size=world)
            sync = manifest.sync(
                records, model_id=runner.model_id, outputs=runner.outputs, retry_failed=options.retry_failed
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
                runner.predictor = _make_predictor(Path(model), device, options)
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
            "process_s": round(process_s, 3),
            "series_per_s": round(runner.stats["processed"] / process_s, 4) if process_s > 0 else None,
            "wall_s": round(time.perf_counter() - wall0, 3),
        }
    if world > 1:
        write_json_atomic(out / f"summary.rank{rank}.json", summary)
    if summary["complete"] or world == 1:
        write_json_atomic(out / "summary.json", summary)
    return summary
