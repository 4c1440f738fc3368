"""Evaluate predicted label volumes against references: case matching, bad input, report.

Bad input never stops the evaluation of the other cases.  Each of these becomes a *problem*
(``summary["problems"]``, the report's "Problems" section, and ``on_problem`` as it happens):

* ``missing_prediction`` / ``missing_reference``: a case on one side only (not scored),
* ``duplicate_case``: several files with one case id on a side (case not scored),
* ``unreadable``: a file that cannot be read as a label volume (case not scored),
* ``geometry``: prediction and reference grids differ and ``resample_to_ref`` is off (not scored),
* ``unexpected_labels``: label values outside the declared set (the case is still scored on the
  declared classes), or, without declared labels, prediction values absent from every reference,
* ``error``: anything else that went wrong for one case (message names the exception).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DatasetError, InputError, MedsegError, OutputExistsError
from medseg.evaluate.inputs import (
    LabelInput,
    find_case_files,
    names_from_meta,
    resample_to_reference,
)
from medseg.evaluate.metrics import (
    ROW_COLUMNS,
    EvalOptions,
    Structure,
    evaluate_case,
    make_structures,
    metrics_from_counts,
    voxel_volume_ml,
)
from medseg.evaluate.overlays import error_focus, render_overlay_png
from medseg.evaluate.report import OVERLAY_DIR, REPORT_FILES, OverlayImage, write_report
from medseg.evaluate.surface import SURFACE_COLUMNS
from medseg.io import VOLUME_SUFFIXES, Geometry, Volume, load_volume, split_suffix
from medseg.types import PathLike

__all__ = ["Problem", "evaluate_folders", "find_label_files", "present_labels"]


@dataclass(frozen=True)
class Problem:
    """One bad input found while evaluating.

    Attributes:
        kind: ``missing_prediction``, ``missing_reference``, ``duplicate_case``, ``unreadable``,
            ``geometry``, ``unexpected_labels`` or ``error``.
        message: What is wrong, naming the file.
        case: Case id (``None`` for problems not tied to one case).
        file: The offending file, if one.
    """

    kind: str
    message: str
    case: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        return f"{self.case}: {self.message}" if self.case else self.message


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
    regions: Mapping[str, Sequence[int | str]] | None = None,
    tolerance_mm: float = 2.0,
    percentile: float = 95.0,
    connectivity: int = 26,
    match_iou: float = 0.1,
    resample_to_ref: bool = False,
    surface: bool = True,
    lesions: bool = True,
    html: bool = True,
    on_problem: Callable[[Problem], None] | None = None,
) -> dict[str, Any]:
    """Compare predicted label volumes with references and write a report.

    Cases are matched by case id, the file name without its suffix (``case_001.nii.gz`` ->
    ``case_001``; layouts: :mod:`medseg.evaluate.inputs`).  Cases left unmatched by name are then
    paired by the image series they belong to (a SEG's referenced series, a batch output's source
    series, a converted NIfTI's ``series_uid``, a DICOM mask series' own UID), then by study when
    each side has exactly one unmatched case of that study; the case id is the reference's.  When
    both ``pred`` and ``ref`` are single files they are compared whatever their names.  Bad input
    is listed as problems (see the module docstring); the other cases are evaluated.

    Args:
        pred: Predicted labels: a file (NIfTI, NRRD, MHA, DICOM SEG), a folder of them, a
            ``medseg batch`` output folder or a folder of DICOM mask series / SEGs.
        ref: Reference labels, in any of the same layouts.
        out_dir: Report folder (see :func:`~medseg.evaluate.report.write_report`).
        label_names: ``{label value: class name}``; ``None`` evaluates every label found in the
            references, named from the files' metadata (DICOM SEG, sidecar) or ``label_<n>``.
        images: Optional folder of images named ``<case>_0000<suffix>`` (nnU-Net) or
            ``<case><suffix>``, or a single image file, shown under the overlays.
        max_overlays: Overlays for at most this many cases, the worst (lowest mean class Dice) first.
        atol: Tolerance (mm) of the grid comparison of prediction and reference.
        overwrite: Replace existing report files.
        regions: ``{region name: [label values or class names]}`` evaluated like classes.
        tolerance_mm: NSD tolerance in mm.
        percentile: Percentile of the robust Hausdorff distance (``hd95_mm``).
        connectivity: Lesion connectivity (6, 18 or 26).
        match_iou: Lesion detection needs IoU above this (0 = any overlap).
        resample_to_ref: Put predictions on a different grid onto the reference grid (nearest
            neighbour) instead of reporting a geometry problem.
        surface: Compute surface distances.
        lesions: Compute lesion-wise metrics.
        html: Write ``report.html``.
        on_problem: Called with each :class:`Problem` as soon as it is found.

    Returns:
        The summary written to ``summary.json`` (``problems`` lists the bad input).

    Raises:
        InputError: ``pred``, ``ref`` or ``images`` does not exist.
        DatasetError: No reference label volumes at all.
        ConfigError: Invalid options or regions.
        OutputExistsError: Report files exist and ``overwrite`` is false (checked before any work).
    """
    pred, ref, out_dir = Path(pred), Path(ref), Path(out_dir)
    options = EvalOptions(
        tolerance_mm=tolerance_mm,
        percentile=percentile,
        connectivity=connectivity,
        match_iou=match_iou,
        surface=surface,
        lesions=lesions,
    )
    if label_names is not None:
        label_names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
        structures: list[Structure] | None = make_structures(label_names, regions)  # validates regions now
    else:
        structures = None
    if not overwrite:
        _require_absent(out_dir)
    problems: list[Problem] = []

    def report(problem: Problem) -> None:
        problems.append(problem)
        if on_problem is not None:
            on_problem(problem)

    pairs = _match_cases(pred, ref, report)
    image_files = _find_images(Path(images), sorted(pairs)) if images is not None else {}

    state = _RunState(label_names=label_names, structures=structures, regions=regions, options=options)
    for case_id in sorted(pairs):
        pred_file, ref_file = pairs[case_id]
        try:
            _evaluate_one(case_id, pred_file, ref_file, state, report, atol=atol, resample=resample_to_ref)
        except MedsegError as exc:
            report(Problem("error", str(exc), case_id))
        except Exception as exc:  # keep going: one broken case must not stop a batch
            report(Problem("error", f"{type(exc).__name__}: {exc}", case_id))

    final_names = state.final_label_names(report)
    rows = _complete_rows(state, final_names)
    region_values = {s.name: list(s.labels) for s in state.structures_for(final_names) if s.kind == "region"}
    warnings: list[str] = []
    overlays = _render_overlays(
        rows, pairs, state, final_names, image_files, max_overlays, warnings, atol=atol, resample=resample_to_ref
    )
    if not state.evaluated:
        warnings.append("no case could be evaluated")
    elif label_names is None and not final_names:
        warnings.append("the references contain no foreground label; nothing to evaluate")
    inputs = {"prediction": str(pred), "reference": str(ref), "images": None if images is None else str(images)}
    option_summary = {**asdict(options), "resample_to_ref": resample_to_ref, "geometry_atol_mm": atol}
    failed = sorted({p.case for p in problems if p.case and p.case not in state.evaluated})
    lesion_rows = [r for r in state.lesion_rows if (r["kind"], r["name"]) in {(r2["kind"], r2["name"]) for r2 in rows}]
    return write_report(
        rows,
        out_dir,
        label_names=final_names,
        lesion_rows=lesion_rows,
        regions=region_values,
        overlays=overlays,
        problems=[asdict(p) for p in problems],
        warnings=warnings,
        options=option_summary,
        extra={
            "n_cases": len(state.evaluated),
            "cases": sorted(state.evaluated),
            "cases_not_evaluated": failed,
            "n_problems": len(problems),
            "inputs": inputs,
        },
        html=html,
        overwrite=overwrite,
    )


# ------------------------------------------------------------------ per case
@dataclass
class _RunState:
    label_names: dict[int, str] | None
    structures: list[Structure] | None
    regions: Mapping[str, Sequence[int | str]] | None
    options: EvalOptions

    def __post_init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.lesion_rows: list[dict[str, Any]] = []
        self.evaluated: dict[str, float] = {}  # case -> voxel volume (mL)
        self.ref_found: set[int] = set()
        self.pred_only: dict[int, list[str]] = {}
        self.meta_names: dict[int, str] = {}
        self.resampled: set[str] = set()

    def structures_for(self, names: Mapping[int, str]) -> list[Structure]:
        if self.structures is not None:
            return self.structures
        return make_structures(names, self.regions)

    def final_label_names(self, report: Callable[[Problem], None]) -> dict[int, str]:
        if self.label_names is not None:
            return dict(self.label_names)
        for value, cases in sorted(self.pred_only.items()):
            if value not in self.ref_found:
                report(
                    Problem(
                        "unexpected_labels",
                        f"prediction label {value} (in {len(cases)} case(s): {', '.join(cases[:10])}) never occurs "
                        "in a reference; not evaluated (pass label names to evaluate it)",
                    )
                )
        return {v: self.meta_names.get(v, f"label_{v}") for v in sorted(self.ref_found)}


def _evaluate_one(
    case_id: str,
    pred_file: LabelInput,
    ref_file: LabelInput,
    state: _RunState,
    report: Callable[[Problem], None],
    *,
    atol: float,
    resample: bool,
) -> None:
    volumes = _read_pair(case_id, pred_file, ref_file, report, atol=atol, resample=resample)
    if volumes is None:
        return
    pred_vol, ref_vol = volumes
    if resample and pred_vol.meta.get("resampled_from"):
        state.resampled.add(case_id)
    if state.label_names is not None:
        structures = state.structures_for(state.label_names)
    else:
        ref_values, pred_values = present_labels(ref_vol) - {0}, present_labels(pred_vol) - {0}
        state.ref_found |= ref_values
        state.meta_names.update({k: v for k, v in names_from_meta(ref_vol).items() if k not in state.meta_names})
        for v in pred_values - ref_values:
            state.pred_only.setdefault(v, []).append(case_id)
        names = {v: state.meta_names.get(v, f"label_{v}") for v in sorted(ref_values | pred_values)}
        structures = state.structures_for(names)
    result = evaluate_case(pred_vol, ref_vol, structures=structures, case_id=case_id, options=state.options, atol=atol)
    if state.label_names is not None:
        declared = set(state.label_names)
        for what, values, file in (
            ("reference", result.present_ref, ref_file),
            ("prediction", result.present_pred, pred_file),
        ):
            extra = sorted(values - declared)
            if extra:
                report(
                    Problem(
                        "unexpected_labels",
                        f"{file}: {what} contains label value(s) {extra} outside the declared labels "
                        f"{sorted(declared)}; they are treated as background",
                        case_id,
                        str(file),
                    )
                )
    state.rows += result.rows
    state.lesion_rows += result.lesion_rows
    state.evaluated[case_id] = voxel_volume_ml(ref_vol)


def _read_pair(
    case_id: str,
    pred_file: LabelInput,
    ref_file: LabelInput,
    report: Callable[[Problem], None],
    *,
    atol: float,
    resample: bool,
) -> tuple[Volume, Volume] | None:
    """Both volumes on the reference grid, or ``None`` after reporting why not."""
    loaded: dict[str, Volume] = {}
    for what, file in (("reference", ref_file), ("prediction", pred_file)):
        try:
            loaded[what] = file.read()
        except MedsegError as exc:
            report(Problem("unreadable", f"{what}: {exc}", case_id, str(file)))
    if len(loaded) < 2:
        return None
    ref_vol, pred_vol = _seg_on_full_grid(loaded["reference"], loaded["prediction"], atol=atol)
    if not ref_vol.geometry.allclose(pred_vol.geometry, atol=atol):
        if not resample:
            report(
                Problem(
                    "geometry",
                    f"{pred_file}: prediction grid ({pred_vol.geometry.describe()}) differs from the reference grid "
                    f"({ref_vol.geometry.describe()}); not evaluated (use --resample-to-ref to resample it)",
                    case_id,
                    str(pred_file),
                )
            )
            return None
        pred_vol = resample_to_reference(pred_vol, ref_vol.geometry)
    elif pred_vol.geometry is not ref_vol.geometry:
        pred_vol = Volume(pred_vol.array, ref_vol.geometry, kind="label", source=pred_vol.source, meta=pred_vol.meta)
    return pred_vol, ref_vol


def _seg_on_full_grid(ref_vol: Volume, pred_vol: Volume, *, atol: float) -> tuple[Volume, Volume]:
    """A DICOM SEG read on its own (non-empty) frames is put on the other side's full grid when its voxels are there."""
    from medseg.errors import GeometryError
    from medseg.io.grid import place_into

    if ref_vol.geometry.allclose(pred_vol.geometry, atol=atol):
        return ref_vol, pred_vol
    try:
        if "segmentation_type" in pred_vol.meta:
            return ref_vol, place_into(pred_vol, ref_vol.geometry, atol=max(atol, 1e-3))
        if "segmentation_type" in ref_vol.meta:
            return place_into(ref_vol, pred_vol.geometry, atol=max(atol, 1e-3)), pred_vol
    except GeometryError:
        pass
    return ref_vol, pred_vol


def _complete_rows(state: _RunState, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Rows of the final structures; both-empty rows for classes absent from a case."""
    structures = state.structures_for(names)
    wanted = {(s.kind, s.name) for s in structures}
    kept = {(r["case"], r["kind"], r["name"]): r for r in state.rows if (r["kind"], r["name"]) in wanted}
    out = []
    for case_id in sorted(state.evaluated):
        for s in structures:
            row = kept.get((case_id, s.kind, s.name))
            if row is None:
                row = _empty_row(case_id, s, state.evaluated[case_id], state.options)
            out.append(row)
    return out


def _empty_row(case_id: str, structure: Structure, voxel_ml: float, options: EvalOptions) -> dict[str, Any]:
    row: dict[str, Any] = {"case": case_id, "kind": structure.kind, "label": structure.label, "name": structure.name}
    row.update(metrics_from_counts(0, 0, 0, voxel_ml=voxel_ml))
    row.update(dict.fromkeys(SURFACE_COLUMNS, math.nan))
    row["nsd_tolerance_mm"] = options.tolerance_mm
    counts = ("ref_lesions", "pred_lesions", "lesion_tp", "lesion_fn", "lesion_fp")
    for column in ROW_COLUMNS:  # lesion columns: no lesion on either side (NaN rates), as lesion_metrics
        row.setdefault(column, 0 if column in counts and options.lesions else math.nan)
    return {c: row[c] for c in ROW_COLUMNS}


# ------------------------------------------------------------------ inputs
def _match_cases(pred: Path, ref: Path, report: Callable[[Problem], None]) -> dict[str, tuple[LabelInput, LabelInput]]:
    """``{case id: (prediction, reference)}``; everything unmatched is reported."""
    ref_files = find_case_files(ref, what="reference")
    pred_files = find_case_files(pred, what="prediction")
    if not ref_files.files and not ref_files.duplicates:
        raise DatasetError(
            f"{ref}: no reference label volumes ({', '.join((*VOLUME_SUFFIXES, '.dcm'))}, DICOM SEG or mask series)"
        )
    if pred.is_file() and ref.is_file():
        only = next(iter(ref_files.files))
        return {only: (next(iter(pred_files.files.values())), ref_files.files[only])}
    for side, found in (("reference", ref_files), ("prediction", pred_files)):
        for case_id, files in sorted(found.duplicates.items()):
            names = ", ".join(f.name for f in files)
            report(Problem("duplicate_case", f"several {side} files for one case: {names}", case_id, str(files[0])))
    skip = set(ref_files.duplicates) | set(pred_files.duplicates)
    common = (set(ref_files.files) & set(pred_files.files)) - skip
    pairs = {c: (pred_files.files[c], ref_files.files[c]) for c in sorted(common)}
    refs_left = {c: f for c, f in ref_files.files.items() if c not in common and c not in skip}
    preds_left = {c: f for c, f in pred_files.files.items() if c not in common and c not in skip}
    for attribute in ("series_uid", "study_uid"):  # names differ: pair by the series, then the study
        for case_id, (pred_id, ref_id) in _pair_by(preds_left, refs_left, attribute).items():
            pairs[case_id] = (preds_left.pop(pred_id), refs_left.pop(ref_id))
    for case_id in sorted(refs_left):
        file = refs_left[case_id]
        report(Problem("missing_prediction", f"no prediction in {pred} for reference {file.name}", case_id, str(file)))
    for case_id in sorted(preds_left):
        file = preds_left[case_id]
        report(Problem("missing_reference", f"no reference in {ref} for prediction {file.name}", case_id, str(file)))
    return dict(sorted(pairs.items()))


def _pair_by(
    preds: Mapping[str, LabelInput], refs: Mapping[str, LabelInput], attribute: str
) -> dict[str, tuple[str, str]]:
    """``{reference case id: (prediction id, reference id)}`` for UIDs held by exactly one case on each side."""
    by_value: dict[str, tuple[list[str], list[str]]] = {}
    for side, items in ((0, preds), (1, refs)):
        for case_id, item in items.items():
            value = getattr(item, attribute)
            if value:
                by_value.setdefault(value, ([], []))[side].append(case_id)
    return {r[0]: (p[0], r[0]) for p, r in by_value.values() if len(p) == 1 and len(r) == 1}


def find_label_files(path: Path, *, what: str = "label") -> dict[str, Path]:
    """``{case id: file}`` of the volume files in a folder, or of a single file.

    Hidden files and files without a volume suffix are skipped.

    Raises:
        InputError: ``path`` does not exist.
        DatasetError: Two files share a case id (e.g. ``a.nii`` and ``a.nii.gz``).
    """
    if not Path(path).exists():
        raise InputError(path, f"no such {what} file or folder")
    found = find_case_files(path, what=what)
    if found.duplicates:
        listing = "; ".join(" / ".join(f.name for f in files) for files in found.duplicates.values())
        raise DatasetError(f"{path}: several {what} files per case: {listing}")
    return {
        k: v.path
        for k, v in found.files.items()
        if v.series is None and (split_suffix(v.path)[1] in VOLUME_SUFFIXES or Path(path).is_file())
    }


def _require_absent(out_dir: Path) -> None:
    for name in REPORT_FILES:
        if (out_dir / name).exists():
            raise OutputExistsError(out_dir / name)
    overlay_dir = out_dir / OVERLAY_DIR
    if overlay_dir.is_dir() and any(p.suffix == ".png" for p in overlay_dir.iterdir()):
        raise OutputExistsError(overlay_dir)


def _find_images(images: Path, case_ids: list[str]) -> dict[str, Path]:
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
    return found


# ------------------------------------------------------------------ overlays
def _worst_cases(rows: Iterable[dict[str, Any]], limit: int) -> list[tuple[str, float]]:
    """Cases ordered by mean class Dice (ascending), without cases that have nothing to show.

    A case whose every class has Dice 1 (or is empty on both sides) is perfect: it is not a "worst
    case" however few cases there are.
    """
    scores: dict[str, list[float]] = {}
    for row in rows:
        if row["kind"] == "class" and not math.isnan(float(row["dice"])):
            scores.setdefault(str(row["case"]), []).append(float(row["dice"]))
    imperfect = {case: values for case, values in scores.items() if min(values) < 1.0}
    ranked = sorted(imperfect.items(), key=lambda kv: (float(np.mean(kv[1])), kv[0]))
    return [(case, float(np.mean(values))) for case, values in ranked[: max(limit, 0)]]


def _render_overlays(
    rows: list[dict[str, Any]],
    pairs: Mapping[str, tuple[LabelInput, LabelInput]],
    state: _RunState,
    names: Mapping[int, str],
    image_files: Mapping[str, Path],
    limit: int,
    warnings: list[str],
    *,
    atol: float,
    resample: bool,
) -> list[OverlayImage]:
    if not names:
        return []
    out = []
    for case_id, mean_dice in _worst_cases([r for r in rows if r["case"] in state.evaluated], limit):
        pred_file, ref_file = pairs[case_id]
        volumes = _read_pair(case_id, pred_file, ref_file, lambda p: None, atol=atol, resample=resample)
        if volumes is None:
            continue
        pred_vol, ref_vol = volumes
        image = _load_image(image_files.get(case_id), ref_vol.geometry, case_id, warnings)
        case_rows = [r for r in rows if r["case"] == case_id and r["kind"] == "class"]
        worst = min(case_rows, key=lambda r: (math.isnan(float(r["dice"])), float(r["dice"])), default=None)
        subtitle = f"mean class Dice {mean_dice:.3f}"
        values = list(names)
        if worst is not None and not math.isnan(float(worst["dice"])):
            subtitle += f"; worst {worst['name']}: Dice {float(worst['dice']):.3f}, HD {_mm(worst['hd_mm'])}"
            values = [int(worst["label"])]
        focus = error_focus(pred_vol.array[0], ref_vol.array[0], values=values, spacing=ref_vol.geometry.spacing)
        png, lps = render_overlay_png(
            case_id=case_id,
            image=image,
            ref=ref_vol,
            pred=pred_vol,
            label_names=names,
            focus=focus,
            subtitle=subtitle,
            highlight=values,
        )
        caption = (
            f"{case_id}: {subtitle}. Planes through the point where the worst class's Hausdorff distance is "
            f"attained, LPS ({lps[0]:.1f}, {lps[1]:.1f}, {lps[2]:.1f}) mm."
        )
        out.append(OverlayImage(case=case_id, png=png, caption=caption, focus_lps_mm=lps))
    missing = [o.case for o in out if o.case not in image_files]
    if image_files and missing:
        warnings.append(f"no image for the overlay of {len(missing)} case(s): {', '.join(missing)}")
    return out


def _mm(value: Any) -> str:
    v = float(value)
    return "inf" if math.isinf(v) else ("n/a" if math.isnan(v) else f"{v:.1f} mm")


def _load_image(path: Path | None, geometry: Geometry, case_id: str, warnings: list[str]) -> Volume | None:
    if path is None:
        return None
    try:
        image = load_volume(path, kind="image")
    except MedsegError as exc:
        warnings.append(f"image of case {case_id} unreadable ({exc}); overlay shown without it")
        return None
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
