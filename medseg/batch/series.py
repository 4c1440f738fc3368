"""The work on one claimed series: load -> model check -> predict -> write each output -> status.

Nothing here touches the manifest: the driver (:mod:`medseg.batch.runner`) turns a claim into a
:class:`SeriesTask`, calls :func:`load_task` and :func:`run_task` (in-process today; another
execution strategy can call the same functions elsewhere) and records the
:class:`SeriesResult`.  Progress is reported through an ``on_stage`` callback.

Outputs go into a fresh temporary folder; each output kind is written independently
(:func:`medseg.infer.writers.write_outputs`), so one that fails costs only itself.  A task may
*carry over* outputs of an earlier run with the same model and inputs (hard links into the new
folder) and, when that run's label volume is among them, take the labels from it instead of
predicting again: ``--retry-failed`` then writes only the missing outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.batch.selection import IDENTIFYING
from medseg.errors import InputError, MedsegError
from medseg.infer.compat import ChannelSpec, check_intensities
from medseg.infer.writers import DICOM_OUTPUTS, OutputNames, OutputResult, dicom_source_problem, write_outputs
from medseg.io.volume import Volume

__all__ = [
    "LoadedSeries",
    "SeriesResult",
    "SeriesTask",
    "load_claimed_series",
    "load_task",
    "phi_terms",
    "redact",
    "run_task",
]

#: Batch file names of the outputs inside a series folder.
NAMES = OutputNames()

StageHook = Callable[[str], None]


@dataclass
class SeriesTask:
    """One series to process, as the execution sees it.

    Attributes:
        key: Series key.
        files: Its files, relative to the archive root.
        series_uid: SeriesInstanceUID (may be empty).
        study_uid: StudyInstanceUID (may be empty).
        modality: DICOM Modality.
        description: SeriesDescription.
        label: How messages name it (pseudonym, study date, series number, description).
        outputs: Output kinds to write.
        carry_dir: Folder of an earlier result with the same model and inputs (absolute), or ``None``.
        carry: ``{kind: {"files": [...]}}`` outputs of ``carry_dir`` to keep.
        labels_from: File (in ``carry_dir``) holding the label volume to reuse instead of predicting.
    """

    key: str
    files: list[str]
    series_uid: str = ""
    study_uid: str = ""
    modality: str = ""
    description: str = ""
    label: str = ""
    outputs: tuple[str, ...] = ("nifti", "json")
    carry_dir: Path | None = None
    carry: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels_from: str | None = None


@dataclass
class LoadedSeries:
    """A task after loading.

    Attributes:
        task: The task.
        volume: The image ``(1, X, Y, Z)`` (``None`` after an error or a skip).
        sources: Source slice headers (for SEG/RTSTRUCT).
        terms: Identifying strings of the series, for redacting messages.
        error: Why loading failed.
        skip: Why the series does not fit the model (voxel-level check).
        load_s: Seconds spent loading.
    """

    task: SeriesTask
    volume: Volume | None = None
    sources: list[Any] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    error: str | None = None
    skip: str | None = None
    load_s: float = 0.0


@dataclass
class SeriesResult:
    """What processing one series produced.

    Attributes:
        outputs: ``{kind: OutputResult}`` of every requested and carried-over output.
        timings: Seconds per stage (``load_s``, ``infer_s``, ``write_s``, the predictor's stages).
        reused_labels: The labels came from an earlier result (no prediction).
    """

    outputs: dict[str, OutputResult]
    timings: dict[str, float] = field(default_factory=dict)
    reused_labels: bool = False

    @property
    def written(self) -> list[str]:
        """Kinds present in the folder."""
        return [kind for kind, result in self.outputs.items() if result.ok]

    @property
    def failed(self) -> dict[str, str]:
        """``{kind: reason}`` of the outputs that failed."""
        return {kind: str(r.error) for kind, r in self.outputs.items() if not r.ok}

    def status(self) -> dict[str, dict[str, Any]]:
        """The manifest's ``output_status``."""
        return {kind: result.as_dict() for kind, result in self.outputs.items()}

    @property
    def files(self) -> list[str]:
        """Every file written or carried over (relative to the series folder)."""
        return [name for result in self.outputs.values() for name in result.files]


# --------------------------------------------------------------------- privacy
def phi_terms(path: Path) -> list[str]:
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


# --------------------------------------------------------------------- loading
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


def load_claimed_series(root: Path, claim: Any) -> Volume:
    """Read a series from its own files (no other series of the archive are scanned).

    Args:
        root: Archive root.
        claim: Anything with ``key`` and ``files`` (relative to ``root``): a claim or a :class:`SeriesTask`.

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
            volume = load_series(candidates[0], source=paths[0].parent)
        except MedsegError as exc:
            if links is None:
                raise
            message = re.sub(re.escape(str(links)) + r"/(\d{6})", lambda m: str(paths[int(m.group(1))]), str(exc))
            raise MedsegError(message.replace(str(links), str(paths[0].parent))) from exc
        if links is not None:  # point the slice files at the real files, not at the links about to vanish
            real = {str(folder / f"{i:06d}"): str(p) for i, p in enumerate(paths)}
            volume.meta["slice_files"] = [real.get(str(f), str(f)) for f in volume.meta.get("slice_files", [])]
        return volume


def load_task(
    root: Path,
    task: SeriesTask,
    *,
    specs: Sequence[ChannelSpec] = (),
    compat_check: bool = True,
    on_stage: StageHook | None = None,
) -> LoadedSeries:
    """Read a task's series (and the source headers its DICOM outputs need); check its voxels fit the model.

    Never raises for a bad series: the reason goes to ``error`` (or ``skip`` for a misfit).
    """
    from medseg.infer.writers import source_headers

    t0 = time.perf_counter()
    item = LoadedSeries(task)
    try:
        if on_stage is not None:
            on_stage("loading")
        first = root / task.files[0] if task.files else root
        item.terms = phi_terms(first) if task.files else []
        item.volume = load_claimed_series(root, task)
        if compat_check and specs:
            item.skip = check_intensities(specs, item.volume)
            if item.skip is not None:
                item.volume = None
                return item
        if DICOM_OUTPUTS & set(task.outputs) and dicom_source_problem(item.volume) is None:
            item.sources = source_headers(item.volume)
    except MedsegError as exc:
        item.error, item.volume = str(exc), None
    except Exception as exc:  # a bad case must not stop the batch
        item.error, item.volume = f"unexpected {type(exc).__name__} while loading: {exc}", None
    finally:
        item.load_s = time.perf_counter() - t0
    return item


# ------------------------------------------------------------------ processing
def _reused_labels(task: SeriesTask, image: Volume) -> Volume | None:
    """The label volume of the earlier result, if it is on this image's grid."""
    from medseg.io import load_volume

    if task.carry_dir is None or task.labels_from is None:
        return None
    try:
        labels = load_volume(task.carry_dir / task.labels_from, kind="label")
    except MedsegError:
        return None
    if labels.channels != 1 or not labels.geometry.allclose(image.geometry, atol=1e-4):
        return None
    return labels


def _carry_over(task: SeriesTask, tmp: Path) -> dict[str, OutputResult]:
    """Hard-link (or copy) the kept outputs of the earlier result into ``tmp``."""
    carried: dict[str, OutputResult] = {}
    if task.carry_dir is None:
        return carried
    for kind, entry in task.carry.items():
        names = [str(n) for n in entry.get("files", [])]
        if not names or not all((task.carry_dir / n).is_file() for n in names):
            continue
        for name in names:
            source, target = task.carry_dir / name, tmp / name
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
        carried[kind] = OutputResult(kind, files=names)
    return carried


def run_task(
    loaded: LoadedSeries,
    predictor: Callable[[], Any],
    tmp: Path,
    *,
    label_names: dict[int, str],
    seg_type: Literal["binary", "labelmap"] = "binary",
    report: dict[str, Any] | None = None,
    on_stage: StageHook | None = None,
    after_predict: Callable[[], None] | None = None,
) -> SeriesResult:
    """Predict (or reuse the labels of an earlier result) and write every output of a task into ``tmp``.

    Args:
        loaded: The loaded task (``volume`` set).
        predictor: Returns the predictor (called only when labels must be predicted): anything with
            ``predict([volume]) -> Volume`` and ``last_timings``.
        tmp: Empty folder the outputs are written into.
        label_names: ``{value: name}`` of the model's classes.
        seg_type: DICOM SEG encoding.
        report: Extra fields of ``volumes.json``.
        on_stage: Progress callback (``"infer"``, ``"writing"``).
        after_predict: Called between prediction and writing (fault injection in tests).

    Returns:
        Per-output results; outputs that failed left nothing in ``tmp``.

    Raises:
        MedsegError: Prediction failed (nothing to write).
    """
    task, volume = loaded.task, loaded.volume
    assert volume is not None
    carried = _carry_over(task, tmp)
    todo = tuple(kind for kind in task.outputs if kind not in carried)
    t0 = time.perf_counter()
    label = _reused_labels(task, volume) if todo else None
    reused = label is not None
    timings: dict[str, float] = {"load_s": round(loaded.load_s, 4)}
    if label is None and todo:
        model = predictor()
        if on_stage is not None:
            on_stage("infer")
        label = model.predict([volume])
        timings.update({k: round(float(v), 4) for k, v in (getattr(model, "last_timings", {}) or {}).items()})
        if carried:  # a new prediction: rewrite everything from it, so that the outputs agree
            for result in carried.values():
                for name in result.files:
                    (tmp / name).unlink(missing_ok=True)
            todo, carried = tuple(dict.fromkeys((*task.outputs, *carried))), {}
    if after_predict is not None:
        after_predict()
    t1 = time.perf_counter()
    timings["infer_s"] = round(t1 - t0, 4)
    results = dict(carried)
    if todo:
        assert label is not None
        if on_stage is not None:
            on_stage("writing")
        label.meta.setdefault("series_uid", task.series_uid)
        written = write_outputs(
            label,
            tmp,
            outputs=todo,
            names=NAMES,
            label_names=label_names,
            image=volume,
            sources=loaded.sources if DICOM_OUTPUTS & set(todo) and loaded.sources else None,
            seg_type=seg_type,
            description=task.description,
            report=report,
            series_name=task.label or None,
        )
        results.update(written)
        timings.update({f"write_{kind}_s": round(r.seconds, 4) for kind, r in written.items()})
    timings["write_s"] = round(time.perf_counter() - t1, 4)
    ordered = {kind: results[kind] for kind in (*task.outputs, *results) if kind in results}
    return SeriesResult(outputs=ordered, timings=timings, reused_labels=reused)
