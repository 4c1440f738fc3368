"""Batch inference over a DICOM archive: discover, select, predict, write, record.

One call of :func:`run_batch` (one ``medseg batch`` process, the *driver*):

1. **Discovery** (headers only, :func:`medseg.io.dicom.scan_dicom`) groups the archive into
   series; every series gets a decision from the selection rules and is streamed into the
   manifest (:mod:`medseg.batch.manifest`) with its input fingerprint.  Non-image objects
   (SR, RTSTRUCT, SEG, ...) become skipped series with the reason; non-DICOM and unreadable
   files are recorded as ignored.
2. **Recovery**: ``running`` rows left by dead processes go back to ``pending``; temporary
   output folders of dead claims are removed.
3. **Processing**, by an execution strategy: in this process (``engine="local"``: loader threads
   claim series atomically and read/decode them into a bounded queue - ``workers`` threads,
   ``prefetch`` slots - while the main thread predicts and writes the previous one, so at most
   ``workers + prefetch + 1`` volumes are in memory whatever the archive size), or on a Ray
   cluster (``engine="ray"``, :mod:`medseg.batch.ray_engine`).  Both run the same per-series
   functions (:func:`read_series`, :func:`predict_series`, :func:`write_series`), which never
   touch the manifest; only the driver claims, renames and records.  All outputs of a series
   are written into ``OUT/.tmp/<claim>/`` and renamed to their final folder inside the manifest
   transaction that marks the series ``done``.  A series that fails is recorded with its
   (redacted) reason and the run continues.
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

Scale-out past one machine: ``engine="ray"`` (docs/batch.md).  The manifest stays on the
driver's local disk; several processes on one host may still share it (claims are atomic).

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

from medseg.batch.manifest import Claim, Manifest, SeriesRecord, fingerprint_files
from medseg.batch.selection import IDENTIFYING, SelectionRules, SeriesInfo, load_rules, plane_of
from medseg.errors import ConfigError, InputError, MedsegError
from medseg.io.images import write_json_atomic, write_volume
from medseg.io.volume import Volume
from medseg.types import PathLike

__all__ = [
    "OUTPUTS",
    "BatchOptions",
    "discover_records",
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
        prefetch: Loaded series waiting in the queue (at least 1); with Ray, series in flight per
            predictor beyond the one it works on (0: no pipelining).
        seg_type: DICOM SEG encoding, ``binary`` or ``labelmap``.
        max_attempts: A series whose process died this often while on it is marked failed.
        lease_s: Claim lease; renewed every ``lease_s / 3`` by a heartbeat.
        progress: Show a progress bar.
        discover: Run discovery (off: work from the manifest as it is).
        process: Process series (off: discovery only).
        device: Inference device (default: the model config's; with Ray: ``cuda`` on actors given a
            GPU, else ``cpu``).
        engine: Where series are processed: ``local`` (this process) or ``ray`` (a Ray cluster,
            :mod:`medseg.batch.ray_engine`; ``workers`` is then the number of predictor actors).
        address: Ray cluster address (``None``: ``RAY_ADDRESS``, a cluster started on this machine
            with ``ray start``, else a new local Ray instance).
        gpus_per_worker: GPUs per Ray predictor actor (default: 1 when the cluster has GPUs, else 0).
        cpus_per_reader: CPUs per Ray read/write task.
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
    device: str | None = None
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    gpus_per_worker: float | None = None
    cpus_per_reader: float = 1.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible settings."""
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown or not self.outputs:
            raise ConfigError(f"--outputs: unknown {unknown or 'empty list'} (choose from {', '.join(OUTPUTS)})")
        if (self.workers is not None and self.workers < 0) or self.prefetch < (0 if self.engine == "ray" else 1):
            raise ConfigError("--workers must be >= 0 and --prefetch >= 1 (>= 0 with --engine ray)")
        if self.seg_type not in ("binary", "labelmap"):
            raise ConfigError(f"--seg-type must be binary or labelmap, got {self.seg_type!r}")
        if self.max_attempts < 1:
            raise ConfigError("--max-attempts must be >= 1")
        if self.engine not in ("local", "ray"):
            raise ConfigError(f"--engine must be local or ray, got {self.engine!r}")
        if (self.gpus_per_worker is not None and self.gpus_per_worker < 0) or self.cpus_per_reader <= 0:
            raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-reader > 0")
        if self.engine == "local" and (self.address or self.gpus_per_worker is not None):
            raise ConfigError("--address and --gpus-per-worker need --engine ray")


# ------------------------------------------------------------------ model
def model_fingerprint(model_dir: PathLike) -> str:
    """Identity of a model directory: SHA-256 of its weights and plan (16 hex digits)."""
    digest = hashlib.sha256()
    for name in ("weights.pt", "plan.yaml"):
        path = Path(model_dir) / name
        try:
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise MedsegError(f"{path}: cannot read the model ({exc.strerror or exc})") from exc
    return digest.hexdigest()[:16]


_CRASH_COUNTS: dict[str, int] = {}


def _crash_point(name: str, key: str = "") -> None:
    """Fault injection for the crash-safety tests.

    ``MEDSEG_BATCH_CRASH_AT=<point>[:<n>]`` SIGKILLs this process the n-th time (default: the
    first) it reaches ``point`` (``claimed``, ``loaded``, ``predicted``, ``outputs_written``,
    ``renamed``, ``committed``).  ``MEDSEG_BATCH_RAISE_AT=<point>:<text>`` raises an exception and
    ``MEDSEG_BATCH_KILL_AT=<point>:<text>`` SIGKILLs the process at ``point`` (``loaded``,
    ``predicted``, ``outputs_written``) for every series whose key contains ``text`` (a worker that
    fails, or dies, on one series).
    """
    for variable in ("MEDSEG_BATCH_RAISE_AT", "MEDSEG_BATCH_KILL_AT"):
        point, _, text = os.environ.get(variable, "").partition(":")
        if point == name and text and text in key:
            if variable == "MEDSEG_BATCH_KILL_AT":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at {name} ({variable})")
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
    root: Path, rules: SelectionRules
) -> tuple[Iterator[SeriesRecord], list[tuple[str, str]], dict[str, Any]]:
    """Discover the archive and describe its series for the manifest.

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


# ------------------------------------------------------- per-series work (no manifest)
# These functions are what every execution strategy runs for a series: in this process
# (:class:`_Runner`) or on Ray workers (:mod:`medseg.batch.ray_engine`).  They never open the
# manifest; the driver alone claims series, renames their outputs into place and records them.
@dataclass(frozen=True)
class SeriesWork:
    """What a worker needs to know to process claimed series (small and picklable).

    Attributes:
        root: Input archive (the same path on every worker).
        out: Output folder (the same path on every worker); outputs go to ``OUT/.tmp/<claim id>/``.
        model_dir: Model directory.
        model_id: :func:`model_fingerprint` of the model the driver saw.
        outputs: Output kinds, in :data:`OUTPUTS` order.
        seg_type: DICOM SEG encoding.
    """

    root: Path
    out: Path
    model_dir: Path
    model_id: str
    outputs: tuple[str, ...]
    seg_type: Literal["binary", "labelmap"] = "binary"

    def temp_dir(self, claim: Claim) -> Path:
        """``OUT/.tmp/<claim id>``: where the outputs of a claim are written before the driver renames them."""
        return _inside(self.out, Path(_TMP) / claim.claim_id)


def read_series(work: SeriesWork, claim: Claim) -> tuple[Volume, list[Any]]:
    """Load a claimed series and, when DICOM outputs need them, its source headers.

    Returns:
        The image volume ``(1, X, Y, Z)`` and the pydicom headers of its slices (empty without
        SEG/RTSTRUCT outputs).

    Raises:
        MedsegError: The series cannot be loaded.
    """
    volume = load_claimed_series(work.root, claim)
    sources = _source_headers(work.root, claim, volume) if {"seg", "rtstruct"} & set(work.outputs) else []
    _crash_point("loaded", claim.key)
    return volume, sources


def predict_series(predictor: Any, claim: Claim, volume: Volume) -> tuple[Volume, dict[str, float]]:
    """Segment a loaded series.

    Returns:
        The label volume ``(1, X, Y, Z)`` on the input grid and the timings (``infer_s`` plus the
        predictor's own stage timings).
    """
    t0 = time.perf_counter()
    label = predictor.predict([volume])
    _crash_point("predicted", claim.key)
    timings = {"infer_s": round(time.perf_counter() - t0, 4)}
    timings.update({k: round(float(v), 4) for k, v in (getattr(predictor, "last_timings", {}) or {}).items()})
    return label, timings


def write_series(
    work: SeriesWork,
    claim: Claim,
    volume: Volume,
    sources: list[Any],
    label: Volume,
    names: dict[int, str],
    timings: dict[str, float],
    *,
    attempt: str | None = None,
) -> dict[str, Any]:
    """Write every output of a series into :meth:`SeriesWork.temp_dir`, the completion marker last.

    Args:
        work: The run's settings.
        claim: The claimed series.
        volume: The image it was segmented from.
        sources: Its source headers (for SEG/RTSTRUCT).
        label: The label volume ``(1, X, Y, Z)`` on the image's grid.
        names: Label value -> class name.
        timings: Timings so far (``load_s``, ``infer_s``, ...); ``write_s`` is added.
        attempt: Write into ``<temp dir>/<attempt>/`` instead, which must not exist while the temp
            dir must (a remote worker's attempt: a stale attempt of a worker thought dead can
            neither disturb another attempt's folder nor recreate a temp dir the driver removed).

    Returns:
        The marker (also written as ``.medseg-series.json``; ``attempt`` names the folder).

    Raises:
        MedsegError: An output cannot be written (the temp folder is removed).
    """
    if attempt is None:
        tmp = work.temp_dir(claim)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    else:
        tmp = work.temp_dir(claim) / attempt
        tmp.mkdir()
    try:
        t0 = time.perf_counter()
        files = _write_outputs(work, tmp, claim, volume, sources, label, names)
        timings = {**timings, "write_s": round(time.perf_counter() - t0, 4)}
        marker = {
            "key": claim.key,
            "series_uid": claim.series_uid,
            "study_uid": claim.study_uid,
            "fingerprint": claim.fingerprint,
            "model_id": work.model_id,
            "outputs": list(work.outputs),
            "files": files,
            "timings": timings,
            "claim_id": claim.claim_id,
            "attempt": attempt,
            "completed_at": time.time(),
        }
        write_json_atomic(tmp / MARKER, marker)
        _crash_point("outputs_written", claim.key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


def _write_outputs(
    work: SeriesWork,
    tmp: Path,
    claim: Claim,
    volume: Volume,
    sources: list[Any],
    label: Volume,
    names: dict[int, str],
) -> list[str]:
    files: list[str] = []
    label.meta.setdefault("series_uid", claim.series_uid)
    if "nifti" in work.outputs:
        write_volume(label, tmp / "segmentation.nii.gz", label_names=names)
        files += ["segmentation.nii.gz", "segmentation.json"]
    if "seg" in work.outputs:
        from medseg.io.dicom_seg import write_dicom_seg

        write_dicom_seg(
            label,
            sources,
            tmp / "seg.dcm",
            label_names=names,
            segmentation_type=work.seg_type,
            series_description=f"medseg SEG {claim.description}".strip()[:64],
        )
        files.append("seg.dcm")
    if "rtstruct" in work.outputs:
        _write_rtstruct(
            label, volume, sources, tmp / "rtstruct.dcm", names, f"medseg RTSTRUCT {claim.description}".strip()[:64]
        )
        files.append("rtstruct.dcm")
    if "json" in work.outputs:
        report = {
            "key": claim.key,
            "series_uid": claim.series_uid,
            "study_uid": claim.study_uid,
            "modality": claim.modality,
            "series_description": claim.description,
            "model": str(work.model_dir),
            "model_id": work.model_id,
            "geometry": label.geometry.to_dict(),
            "voxel_volume_ml": abs(float(np.linalg.det(label.geometry.affine[:3, :3]))) / 1000.0,
            "classes": _volumes_ml(label, names),
        }
        write_json_atomic(tmp / "volumes.json", report)
        files.append("volumes.json")
    return files


def label_names_of(predictor: Any) -> dict[int, str]:
    """Label value -> class name of a predictor."""
    return {int(k): str(v) for k, v in predictor.label_names.items()}


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
    def __init__(self, root: Path, out: Path, model: Path, options: BatchOptions, manifest: Manifest):
        self.root, self.out, self.model_dir, self.options = root, out, model, options
        self.manifest = manifest
        self.model_id = model_fingerprint(model)
        self.outputs = tuple(o for o in OUTPUTS if o in options.outputs)
        self.work = SeriesWork(root, out, model, self.model_id, self.outputs, options.seg_type)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._stop = threading.Event()
        self.predictor: Any = None
        self.workers = options.workers if options.workers is not None else 0
        self.stats = {"processed": 0, "done": 0, "failed": 0, "adopted": 0}
        self.bar: Any = None
        self.engine_info: dict[str, Any] = {"engine": options.engine}

    # ---------------------------------------------------------------- claims
    def _claim(self) -> Claim | None:
        if self._stop.is_set():
            return None
        claim = self.manifest.claim(lease_s=self.options.lease_s)
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

    def prepare(self, claim: Claim) -> _Item:
        """Driver-side checks of a claimed series before any pixel is read.

        Reads the identifying terms for redaction, finds outputs completed by an interrupted run
        (``item.adopt``) and refuses DICOM outputs for series without UIDs (``item.error``).
        """
        item = _Item(claim)
        try:
            first = self.root / claim.files[0] if claim.files else self.root
            item.terms = _phi_terms(first) if claim.files else []
            item.adopt = self._adoptable(claim)
            dicom_out = {"seg", "rtstruct"} & set(self.outputs)
            if item.adopt is None and dicom_out and not (claim.series_uid and claim.study_uid):
                raise InputError(
                    first,
                    "empty SeriesInstanceUID/StudyInstanceUID (anonymised by blanking UIDs?): DICOM SEG/RTSTRUCT"
                    " outputs must reference the source by UID; run with --outputs nifti,json for this series",
                )
        except MedsegError as exc:
            item.error = str(exc)
        except Exception as exc:  # a bad case must not stop the batch
            item.error = f"unexpected {type(exc).__name__} while loading: {exc}"
        return item

    def load(self, claim: Claim) -> _Item:
        t0 = time.perf_counter()
        self.manifest.set_stage(claim, "loading")
        item = self.prepare(claim)
        if item.error is None and item.adopt is None:
            try:
                item.volume, item.sources = read_series(self.work, claim)
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
                self.adopt(item)
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

    def adopt(self, item: _Item) -> None:
        """Record a series whose outputs an interrupted run completed (``item.adopt``) as done."""
        assert item.adopt is not None
        final = self.final_dir(item.claim)
        ok = self.manifest.complete(
            item.claim,
            out_dir=str(final.relative_to(self.out.resolve())),
            outputs=item.adopt.get("outputs", self.outputs),
            model_id=self.model_id,
            timings=item.adopt.get("timings"),
            detail="adopted outputs completed by an interrupted run",
        )
        self.stats["adopted"] += ok
        self.stats["done"] += ok

    def _fail(self, item: _Item, error: str, *, timings: dict[str, float] | None = None) -> None:
        message = redact(error, item.terms, root=self.root)
        if self.manifest.fail(item.claim, message, timings=timings):
            self.stats["failed"] += 1
            if self.bar is not None:
                self.bar.write(f"failed: {item.claim.key}: {message}")

    def finish(
        self,
        item: _Item,
        *,
        marker: dict[str, Any] | None = None,
        error: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """Record the outcome of a series processed elsewhere: adopted, failed, or committed from ``marker``."""
        self.stats["processed"] += 1
        try:
            if item.adopt is not None:
                self.adopt(item)
            elif error is not None or item.error is not None:
                self._fail(item, error if error is not None else str(item.error), timings=timings)
                shutil.rmtree(self.work.temp_dir(item.claim), ignore_errors=True)
            else:
                assert marker is not None
                try:
                    self.commit(item, marker)
                except MedsegError as exc:
                    self._fail(item, str(exc), timings=marker.get("timings"))
                else:
                    self.stats["done"] += 1
        finally:
            self._drop(item.claim)
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(done=self.stats["done"], failed=self.stats["failed"], refresh=False)

    def commit(self, item: _Item, marker: dict[str, Any]) -> None:
        """Rename the finished temp folder of a claim into place and mark the series done (one transaction).

        Raises:
            MedsegError: The claim was lost (lease expired and reclaimed); the outputs are discarded.
        """
        claim = item.claim
        tmp = self.work.temp_dir(claim)
        done = tmp / marker["attempt"] if marker.get("attempt") else tmp
        final = self.final_dir(claim)
        try:
            missing = [name for name in [*marker.get("files", []), MARKER] if not (done / name).is_file()]
            if missing:
                raise MedsegError(f"series {claim.key}: outputs {missing} missing from the finished folder")
            ok = self.manifest.complete(
                claim,
                out_dir=str(final.relative_to(self.out.resolve())),
                outputs=self.outputs,
                model_id=self.model_id,
                timings=marker.get("timings"),
                commit=lambda: self._commit_dir(done, final, claim),
            )
            if not ok:
                raise MedsegError(
                    f"series {claim.key}: claim lost to another process (lease expired); outputs discarded"
                )
            _crash_point("committed")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _predict_and_write(self, item: _Item) -> dict[str, float]:
        claim, volume = item.claim, item.volume
        assert volume is not None
        self.manifest.set_stage(claim, "infer")
        label, timings = predict_series(self.predictor, claim, volume)
        self.manifest.set_stage(claim, "writing")
        timings = {"load_s": round(item.load_s, 4), **timings}
        try:
            marker = write_series(
                self.work, claim, volume, item.sources, label, label_names_of(self.predictor), timings
            )
        except BaseException:
            shutil.rmtree(self.work.temp_dir(claim), ignore_errors=True)
            raise
        self.commit(item, marker)
        return dict(marker["timings"])

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
            for row in self.manifest.rows("done")
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
            desc="batch",
            disable=not self.options.progress,
            dynamic_ncols=True,
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="medseg-batch-heartbeat", daemon=True)
        heartbeat.start()
        try:
            if self.options.engine == "ray":
                from medseg.batch.ray_engine import run_on_ray

                self.engine_info = run_on_ray(self)
            elif self.workers == 0:
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


def _make_predictor(model: Path, device: str | None) -> Any:
    from medseg.infer.predictor import Predictor
    from medseg.models.package import load_model

    loaded = load_model(model)
    infer = loaded.config.infer
    if device is not None:
        infer = infer.model_copy(update={"device": device})
    return Predictor(loaded, infer=infer)


def run_batch(
    input_root: PathLike,
    model: PathLike,
    out_dir: PathLike,
    options: BatchOptions | None = None,
) -> dict[str, Any]:
    """Segment every eligible series of a DICOM archive, resumably (see the module docstring).

    Args:
        input_root: Archive folder (searched recursively).
        model: Model directory.
        out_dir: Output folder (created); holds the manifest and one folder per series.
        options: Run settings.

    Returns:
        The summary (also written to ``OUT/summary.json`` once nothing is pending or running).

    Raises:
        InputError: The input root does not exist.
        ConfigError: Invalid options or rules.
        ModelError: The model directory cannot be loaded.
    """
    options = options or BatchOptions()
    options.validate()
    if options.engine == "ray":
        from medseg.batch.ray_engine import import_ray

        import_ray()  # a clear error naming the extra before any work
    wall0 = time.perf_counter()
    root = Path(input_root).resolve()
    out = Path(out_dir).resolve()
    if not root.is_dir():
        raise InputError(root, "no such folder" if not root.exists() else "not a folder")
    if out == root or out.is_relative_to(root):
        raise ConfigError(f"{out}: the output folder must not be inside the input archive {root}")
    rules = load_rules(options.rules)
    out.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings(), Manifest(out / "manifest.sqlite") as manifest:
        # Library warnings can quote header values (patient names): keep them out of the logs.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(highdicom|pydicom)(\.|$)")
        runner = _Runner(root, out, Path(model), options, manifest)
        discovery: dict[str, Any] = {}
        if options.discover:
            records, ignored, discovery = discover_records(root, rules)
            sync = manifest.sync(
                records, model_id=runner.model_id, outputs=runner.outputs, retry_failed=options.retry_failed
            )
            manifest.add_ignored(ignored)
            discovery["sync"] = vars(sync)
            discovery["discovery_and_sync_s"] = time.perf_counter() - wall0
        elif options.retry_failed:
            raise ConfigError("--retry-failed needs discovery (drop --no-discovery)")
        reclaimed = manifest.reclaim(max_attempts=options.max_attempts)
        runner.cleanup_tmp()
        lost = runner.verify_done()
        t_process = time.perf_counter()
        if options.process:
            total = manifest.count("pending")
            if total and options.engine == "local":
                runner.predictor = _make_predictor(Path(model), options.device)
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
            "workers": runner.workers,
            "prefetch": options.prefetch,
            **runner.engine_info,
            "reclaimed": len(reclaimed),
            "outputs_missing": len(lost),
            **{k: v for k, v in discovery.items()},
            **runner.stats,
            "process_s": round(process_s, 3),
            "series_per_s": round(runner.stats["processed"] / process_s, 4) if process_s > 0 else None,
            "wall_s": round(time.perf_counter() - wall0, 3),
        }
    write_json_atomic(out / "summary.json", summary)
    return summary
