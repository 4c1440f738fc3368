"""Overlay images: three orthogonal slices through the largest error, reference vs prediction contours.

The largest error of a case is where the Hausdorff distance of its worst structure is attained
(:func:`error_focus`).

The volumes are shown in the closest RAS orientation (nibabel ``io_orientation``; an oblique grid
is shown along its own axes), in the radiological convention: axial and coronal with the patient's
right on the left of the screen, axial with anterior up, coronal and sagittal with superior up and
sagittal with anterior on the left.  Pixels are drawn with their true size in mm, so the aspect
ratio follows the spacing.  Reference contours are solid sky blue, prediction contours dashed
orange (:data:`REFERENCE_COLOUR`, :data:`PREDICTION_COLOUR`: the Okabe-Ito pair, distinct for
colour-blind readers and on grey images), with a legend; the structures named in ``highlight``
(the case's worst class) are drawn thick, the others thin; a white cross marks the point the
three planes go through.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from medseg.evaluate.surface import farthest_surface_point
from medseg.io.volume import LPS_FROM_RAS, Volume

__all__ = ["PREDICTION_COLOUR", "REFERENCE_COLOUR", "error_focus", "render_overlay_png"]

_MARGIN_MM = 15.0
#: Contour colours (Okabe-Ito sky blue and orange).
REFERENCE_COLOUR = "#56B4E9"
PREDICTION_COLOUR = "#E69F00"


def error_focus(
    pred: np.ndarray, ref: np.ndarray, *, values: Sequence[int], spacing: Sequence[float]
) -> tuple[int, int, int]:
    """The voxel of the largest error of one structure: where its Hausdorff distance is attained.

    Args:
        pred: Predicted labels ``(X, Y, Z)``.
        ref: Reference labels ``(X, Y, Z)``.
        values: Label values of the structure (one class, or a region's classes).
        spacing: Voxel size in mm.

    Returns:
        Index ``(x, y, z)``: the surface voxel of either mask farthest from the other mask's surface;
        if only one mask is non-empty, its voxel closest to its centre of mass; the grid centre if
        both are empty.
    """
    wanted = np.asarray(sorted(set(values)), dtype=np.int64)
    pred_mask, ref_mask = np.isin(pred, wanted), np.isin(ref, wanted)
    found = farthest_surface_point(pred_mask, ref_mask, spacing=spacing)
    if found is not None:
        return found[0]  # type: ignore[return-value]
    for mask in (ref_mask, pred_mask):
        boxes = ndimage.find_objects(mask.view(np.uint8))
        if boxes and boxes[0] is not None:
            points = np.argwhere(mask[boxes[0]])
            best = points[int(np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1)))]
            return tuple(int(v + s.start) for v, s in zip(best, boxes[0], strict=True))  # type: ignore[return-value]
    return tuple(int(n // 2) for n in ref.shape)  # type: ignore[return-value]


def render_overlay_png(
    *,
    case_id: str,
    image: Volume | None,
    ref: Volume,
    pred: Volume,
    label_names: Mapping[int, str],
    focus: Sequence[int] | None = None,
    subtitle: str = "",
    dpi: int = 80,
    highlight: Sequence[int] = (),
) -> tuple[bytes, tuple[float, float, float]]:
    """PNG of axial, coronal and sagittal slices through ``focus`` with class contours.

    Args:
        case_id: Shown in the title.
        image: Image ``(C, X, Y, Z)`` on the reference grid (first channel shown), or ``None``.
        ref: Reference labels ``(1, X, Y, Z)``.
        pred: Predicted labels ``(1, X, Y, Z)`` on the same grid.
        label_names: ``{label value: class name}`` of the classes to outline (0 skipped).
        focus: Voxel index the planes go through (default: :func:`error_focus` of all classes).
        subtitle: Second title line (e.g. the case's worst scores).
        dpi: Resolution of the figure.
        highlight: Label values drawn with thick contours (default: all classes thick).

    Returns:
        ``(png bytes, focus point in LPS mm)``.

    Raises:
        GeometryError: The volumes are not on one grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    geometry = ref.geometry
    geometry.require_same(pred.geometry, what=f"overlay prediction and reference for case {case_id}")
    if image is not None:
        geometry.require_same(image.geometry, what=f"overlay image and reference for case {case_id}", atol=1e-3)
    # Colours go to the classes present in this case only, so that few classes get distinct colours.
    present = _present(ref.array[0]) | _present(pred.array[0])
    values = sorted(v for v in label_names if v != 0 and v in present)
    if focus is None:
        focus = error_focus(pred.array[0], ref.array[0], values=values, spacing=geometry.spacing)
    point = tuple(int(v) for v in focus)
    ornt = nib.orientations.io_orientation(geometry.affine)
    ref_ras, pred_ras = (_to_ras(v.array[0], ornt) for v in (ref, pred))
    image_ras = _to_ras(image.array[0], ornt) if image is not None else None
    spacing = _ras_values(geometry.spacing, ornt)
    p = _ras_index(point, geometry.shape, ornt)
    fov = _field_of_view(ref_ras, pred_ras, values, spacing)
    window = _window(image_ras) if image_ras is not None else (0.0, 1.0)

    fig = Figure(figsize=(13.5, 5.2), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    thick = set(highlight) or set(values)
    shown: set[int] = set()
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal"), strict=True):
        cut = _plane_cut(plane, p)
        extent = _plane_extent(plane, ref_ras.shape, spacing)
        if image_ras is not None:
            lo, hi = window
            ax.imshow(_screen(image_ras[cut], plane), cmap="gray", vmin=lo, vmax=hi, extent=extent)
        else:
            ax.imshow(np.zeros((2, 2)), cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
        ref_plane, pred_plane = _screen(ref_ras[cut], plane), _screen(pred_ras[cut], plane)
        for value in sorted(values, key=lambda v: v in thick):  # thick (highlighted) contours drawn last, on top
            for labels, colour, style in (
                (ref_plane, REFERENCE_COLOUR, "solid"),
                (pred_plane, PREDICTION_COLOUR, "dashed"),
            ):
                mask = labels == value
                if mask.any() and not mask.all():
                    shown.add(value)
                    ax.contour(
                        mask.astype(np.float32),
                        levels=[0.5],
                        colors=[colour],
                        linewidths=2.0 if value in thick else 1.1,
                        linestyles=style,
                        alpha=1.0 if value in thick else 0.85,
                        extent=extent,
                        origin="upper",
                    )
        mark = _screen_point(plane, p, ref_ras.shape, spacing)
        ax.plot([mark[0]], [mark[1]], marker="+", color="white", markersize=14, markeredgewidth=1.5)
        _zoom(ax, plane, fov, ref_ras.shape, spacing)
        ax.set_title(_plane_title(plane, geometry, point), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    handles = [
        Line2D([], [], color=REFERENCE_COLOUR, linestyle="solid", linewidth=2.0, label="reference"),
        Line2D([], [], color=PREDICTION_COLOUR, linestyle="dashed", linewidth=2.0, label="prediction"),
    ]
    emphasised = [label_names[v] for v in values if v in thick and v in shown]
    if emphasised and len(thick) < len(values):
        names = ", ".join(emphasised[:3]) + (" ..." if len(emphasised) > 3 else "")
        handles.append(Line2D([], [], color="black", linewidth=2.0, label=f"thick: {names}; thin: other classes"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    title = f"{case_id}" + (f" — {subtitle}" if subtitle else "")
    fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.1, wspace=0.04)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    ras = geometry.affine @ np.array([*point, 1.0])
    lps = LPS_FROM_RAS @ ras[:3]
    return buffer.getvalue(), (float(lps[0]), float(lps[1]), float(lps[2]))


def _present(labels: np.ndarray) -> set[int]:
    """Label values occurring in an integer array."""
    if labels.size and int(labels.max()) < 1 << 16:
        return {int(v) for v in np.flatnonzero(np.bincount(labels.ravel()))}
    return {int(v) for v in np.unique(labels)}


def _window(image: np.ndarray) -> tuple[float, float]:
    """Grey-level window: soft tissue (-160..240 HU) for CT-like values, else the 1st-99th percentiles."""
    step = [max(1, n // 64) for n in image.shape]
    sample = image[:: step[0], :: step[1], :: step[2]]
    lo, hi = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if lo <= -500 and hi >= 100:  # Hounsfield units: air and soft tissue present
        return (-160.0, 240.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


# ------------------------------------------------------------------ orientation helpers
def _to_ras(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return np.asarray(nib.orientations.apply_orientation(array, ornt))


def _ras_values(values: Sequence[float], ornt: np.ndarray) -> tuple[float, float, float]:
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = float(values[axis])
    return (out[0], out[1], out[2])


def _ras_index(point: Sequence[int], shape: Sequence[int], ornt: np.ndarray) -> tuple[int, int, int]:
    out = [0, 0, 0]
    for axis, (target, flip) in enumerate(ornt):
        out[int(target)] = int(point[axis]) if flip > 0 else int(shape[axis]) - 1 - int(point[axis])
    return (out[0], out[1], out[2])


def _plane_cut(plane: str, p: Sequence[int]) -> tuple[Any, ...]:
    if plane == "axial":
        return (slice(None), slice(None), p[2])
    if plane == "coronal":
        return (slice(None), p[1], slice(None))
    return (p[0], slice(None), slice(None))


def _screen(plane_array: np.ndarray, plane: str) -> np.ndarray:
    """RAS plane -> (rows, columns) for ``imshow(origin="upper")`` in radiological convention.

    axial (x, y): columns = x reversed (patient right on the left), rows = y reversed (anterior up);
    coronal (x, z): columns = x reversed, rows = z reversed (superior up);
    sagittal (y, z): columns = y reversed (anterior on the left), rows = z reversed.
    """
    return np.ascontiguousarray(plane_array[::-1, ::-1].T)


def _plane_axes(plane: str) -> tuple[int, int]:
    """RAS axes along (columns, rows) of a plane."""
    return {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[plane]


def _plane_extent(plane: str, shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float, float]:
    """``imshow`` extent in mm (left, right, bottom, top) of a whole plane."""
    col_axis, row_axis = _plane_axes(plane)
    width, height = shape[col_axis] * spacing[col_axis], shape[row_axis] * spacing[row_axis]
    return (0.0, width, height, 0.0)


def _screen_point(plane: str, p: Sequence[int], shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float]:
    col_axis, row_axis = _plane_axes(plane)
    x = (shape[col_axis] - 1 - p[col_axis] + 0.5) * spacing[col_axis]
    y = (shape[row_axis] - 1 - p[row_axis] + 0.5) * spacing[row_axis]
    return x, y


def _field_of_view(
    ref: np.ndarray, pred: np.ndarray, values: Sequence[int], spacing: Sequence[float]
) -> list[tuple[int, int]] | None:
    """Per RAS axis ``(first, last)`` voxel of the evaluated foreground in either volume."""
    wanted = np.asarray(values, dtype=np.int64)
    boxes = ndimage.find_objects((np.isin(ref, wanted) | np.isin(pred, wanted)).view(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    return [(int(s.start), int(s.stop) - 1) for s in boxes[0]]


def _zoom(
    ax: Any, plane: str, fov: list[tuple[int, int]] | None, shape: Sequence[int], spacing: Sequence[float]
) -> None:
    """Limit the axes to the foreground bounding box plus a margin (square-ish, in mm)."""
    col_axis, row_axis = _plane_axes(plane)
    width, height = shape[col_axis] * spacing[col_axis], shape[row_axis] * spacing[row_axis]
    if fov is None:
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        return
    lims = []
    for axis, size in ((col_axis, width), (row_axis, height)):
        first, last = fov[axis]
        lo = (shape[axis] - 1 - last) * spacing[axis] - _MARGIN_MM
        hi = (shape[axis] - first) * spacing[axis] + _MARGIN_MM
        lims.append((max(lo, 0.0), min(hi, size)))
    ax.set_xlim(*lims[0])
    ax.set_ylim(lims[1][1], lims[1][0])


def _plane_title(plane: str, geometry: Any, point: Sequence[int]) -> str:
    """``"axial, S 12.5 mm"``: the plane and its RAS world coordinate."""
    ras = geometry.affine @ np.array([*point, 1.0])
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    value = float(ras[axis])
    if not math.isfinite(value):
        return plane
    return f"{plane}, {'RAS'[axis]} {value:.1f} mm"
