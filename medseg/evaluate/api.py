"""Evaluate a folder of predicted label volumes against a folder of references."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError, InputError, OutputExistsError
from medseg.evaluate.metrics import case_metrics, metrics_from_counts, voxel_volume_ml
from medseg.evaluate.report import OVERLAY_DIR, Overlay, best_slice, overlay_name, write_report
from medseg.io import VOLUME_SUFFIXES, Geometry, Volume, load_volume, split_suffix
from medseg.types import PathLike

__all__ = ["evaluate_folders", "find_label_files"]


def evaluate_folders(
    pred: PathLike,
    ref: PathLike,
    *,
    out_dir: PathLike,
    label_names: dict[int, str] | None = None,
    images: PathLike | None = None,
    max_overlays: int = 8,
    atol: float = 1e-4,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compare predicted label volumes with references and write a report.

    Cases are matched by case id, the file name without its volume suffix
    (``case_001.nii.gz`` -> ``case_001``).  When both ``pred`` and ``ref`` are single
    files they are compared whatever their names (the case id is the reference's).
    Every reference case needs a prediction; predictions without a reference are
    ignored and reported as a warning.

    Args:
        pred: Folder of predicted label volumes (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``)
            or a single file.
        ref: Folder of reference label volumes or a single file.
        out_dir: Report folder (see :func:`~medseg.evaluate.report.write_report`).
        label_names: ``{label value: class name}``; ``None`` evaluates every label found in
            the references, named ``label_<n>``.
        images: Optional folder of images named ``<case>_0000.nii.gz`` (nnU-Net) or
            ``<case>.nii.gz`` (any volume suffix), or a single image file, shown under
            the overlays.
        max_overlays: Overlay PNGs for at most this many cases (the first by case id).
        atol: Tolerance (mm) of the grid comparison of prediction and reference.
        overwrite: Replace existing report files.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        InputError: A path does not exist or a volume cannot be read.
        DatasetError: No reference volumes, duplicate case ids, or reference cases without
            a prediction (all of them are listed).  Nothing is written.
        GeometryError: A prediction is not on its reference's grid.
        OutputExistsError: Report files exist and ``overwrite`` is false.
    """
    pred, ref, out_dir = Path(pred), Path(ref), Path(out_dir)
    ref_files = find_label_files(ref, what="reference")
    if not ref_files:
        raise DatasetError(f"{ref}: no reference label volumes ({', '.join(VOLUME_SUFFIXES)})")
    pred_files = find_label_files(pred, what="prediction")
    if pred.is_file() and ref.is_file():
        pred_files = {next(iter(ref_files)): pred}
    missing = sorted(set(ref_files) - set(pred_files))
    if missing:
        raise DatasetError(
            f"{pred}: no prediction for {len(missing)} of {len(ref_files)} reference case(s): {', '.join(missing)}"
        )
    warnings: list[str] = []
    extra = sorted(set(pred_files) - set(ref_files))
    if extra:
        warnings.append(f"ignored {len(extra)} prediction(s) without a reference: {', '.join(extra)}")
    case_ids = sorted(ref_files)
    overlay_ids = case_ids[: max(max_overlays, 0)]
    if not overwrite:
        _require_absent(out_dir, overlay_ids)
    image_files = _find_images(Path(images), overlay_ids, warnings) if images is not None else {}

    rows: list[dict[str, Any]] = []
    overlays: list[Overlay] = []
    voxel_ml: dict[str, float] = {}
    found: set[int] = set()
    for case_id in case_ids:
        ref_vol = load_volume(ref_files[case_id], kind="label")
        pred_vol = load_volume(pred_files[case_id], kind="label")
        if label_names is None:
            ref_labels = present_labels(ref_vol)
            found |= ref_labels
            names = {v: f"label_{v}" for v in ref_labels | present_labels(pred_vol)}
        else:
            names = label_names
        rows += case_metrics(pred_vol, ref_vol, label_names=names, case_id=case_id, atol=atol)
        voxel_ml[case_id] = voxel_volume_ml(ref_vol)
        if case_id in overlay_ids:
            image = _load_image(image_files.get(case_id), ref_vol.geometry, case_id, warnings)
            overlays.append(_overlay_slab(case_id, image, ref_vol, pred_vol))
    if label_names is None:
        label_names = {v: f"label_{v}" for v in sorted(found - {0})}
        rows = _complete_rows(rows, label_names, voxel_ml)
        if not label_names:
            warnings.append("the references contain no foreground label; nothing to evaluate")
    inputs = {"prediction": str(pred), "reference": str(ref), "images": None if images is None else str(images)}
    return write_report(
        rows,
        out_dir,
        label_names=label_names,
        overlays=overlays,
        warnings=warnings,
        extra={"n_cases": len(case_ids), "cases": case_ids, "inputs": inputs},
        overwrite=overwrite,
    )


# ------------------------------------------------------------------ inputs
def find_label_files(path: Path, *, what: str = "label") -> dict[str, Path]:
    """``{case id: file}`` of the volume files in a folder, or of a single file.

    Hidden files and files without a volume suffix are skipped.

    Raises:
        InputError: ``path`` does not exist.
        DatasetError: Two files share a case id (e.g. ``a.nii`` and ``a.nii.gz``).
    """
    if not path.exists():
        raise InputError(path, f"no such {what} file or folder")
    candidates = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    found: dict[str, Path] = {}
    duplicates: list[str] = []
    for file in candidates:
        case_id, suffix = split_suffix(file)
        if file.name.startswith(".") or suffix not in VOLUME_SUFFIXES:
            continue
        if case_id in found:
            duplicates.append(f"{found[case_id].name} / {file.name}")
        found[case_id] = file
    if duplicates:
        raise DatasetError(f"{path}: several {what} files per case: {'; '.join(duplicates)}")
    return found


def _require_absent(out_dir: Path, overlay_ids: Iterable[str]) -> None:
    names = ["metrics.csv", "summary.json", "report.md"]
    names += [f"{OVERLAY_DIR}/{overlay_name(case_id)}" for case_id in overlay_ids]
    for name in names:
        if (out_dir / name).exists():
            raise OutputExistsError(out_dir / name)


def _find_images(images: Path, case_ids: list[str], warnings: list[str]) -> dict[str, Path]:
    """Image file of each case: ``<case>_0000<suffix>``, else ``<case><suffix>``."""
    if not images.exists():
        raise InputError(images, "no such image file or folder")
    if images.is_file():
        return {case_ids[0]: images} if len(case_ids) == 1 else {}
    found: dict[str, Path] = {}
    for case_id in case_ids:
        for stem in (f"{case_id}_0000", case_id):
            match = next((images / f"{stem}{s}" for s in VOLUME_SUFFIXES if (images / f"{stem}{s}").is_file()), None)
            if match is not None:
                found[case_id] = match
                break
    absent = [c for c in case_ids if c not in found]
    if absent:
        warnings.append(f"no image for the overlay of {len(absent)} case(s): {', '.join(absent)}")
    return found


def _load_image(path: Path | None, geometry: Geometry, case_id: str, warnings: list[str]) -> Volume | None:
    if path is None:
        return None
    image = load_volume(path, kind="image")
    if not image.geometry.allclose(geometry, atol=1e-3):
        warnings.append(f"image of case {case_id} is not on the reference grid; overlay shown without it")
        return None
    return image


# ----------------------------------------------------------------- helpers
def present_labels(volume: Volume) -> set[int]:
    """Label values occurring in a label volume (including 0 if present)."""
    array = volume.array
    if array.size == 0:
        return set()
    if int(array.max()) < 1 << 16:
        return {int(v) for v in np.flatnonzero(np.bincount(array.reshape(-1)))}
    return {int(v) for v in np.unique(array)}


def _complete_rows(
    rows: list[dict[str, Any]], label_names: dict[int, str], voxel_ml: dict[str, float]
) -> list[dict[str, Any]]:
    """Keep the rows of ``label_names``; add both-empty rows for labels absent from a case."""
    kept = {(r["case"], r["label"]): r for r in rows if r["label"] in label_names}
    out = []
    for case_id in sorted(voxel_ml):
        for value, name in sorted(label_names.items()):
            row = kept.get((case_id, value))
            if row is None:
                row = {"case": case_id, "label": value, "name": name}
                row.update(metrics_from_counts(0, 0, 0, voxel_ml=voxel_ml[case_id]))
            out.append(row)
    return out


def _slab(volume: Volume, k: int, geometry: Geometry) -> Volume:
    """Copy of axial slice ``k`` (array ``(1, X, Y, 1)``) on the given one-slice grid."""
    array = np.ascontiguousarray(volume.array[:1, :, :, k : k + 1])
    return Volume(array=array, geometry=geometry, kind=volume.kind, source=volume.source)


def _overlay_slab(case_id: str, image: Volume | None, ref: Volume, pred: Volume) -> Overlay:
    """The overlay inputs reduced to the slice the report shows (keeps memory small)."""
    k = best_slice(ref.array[0], pred.array[0])
    affine = ref.geometry.affine.copy()
    affine[:, 3] = ref.geometry.affine @ np.array([0.0, 0.0, float(k), 1.0])
    geometry = Geometry(shape=(ref.geometry.shape[0], ref.geometry.shape[1], 1), affine=affine)
    image_slab = None if image is None else _slab(image, k, geometry)
    return (case_id, image_slab, _slab(ref, k, geometry), _slab(pred, k, geometry))
