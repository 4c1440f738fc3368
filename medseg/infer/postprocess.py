"""Post-processing of label volumes: connected components and holes, per class, spacing-aware.

All operations work on the label volume on the input grid (so sizes in mm³ use the
input's voxel spacing), one class at a time, restricted to the class's bounding box
(``scipy.ndimage.find_objects``) so whole-body volumes stay cheap.  Removed voxels
become background (0); holes are filled only where the label is background, so one
class never overwrites another.  Connectivity is face connectivity (6-neighbourhood)
by default, as in nnU-Net's and MONAI's ``KeepLargestConnectedComponent``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "PostprocessOptions",
    "fill_holes",
    "keep_largest_component",
    "postprocess_labels",
    "remove_small_components",
]


@dataclass(frozen=True)
class PostprocessOptions:
    """What :func:`postprocess_labels` does, in this order.

    Attributes:
        min_component_mm3: Remove connected components smaller than this (mm³); 0 = off.
        keep_largest_component: Keep only the largest component of every class.
        fill_holes: Fill enclosed background cavities of every class.
        classes: Restrict all operations to these label values (default: all foreground classes).
        connectivity: 1 (faces), 2 (faces + edges) or 3 (26-neighbourhood).
    """

    min_component_mm3: float = 0.0
    keep_largest_component: bool = False
    fill_holes: bool = False
    classes: tuple[int, ...] | None = None
    connectivity: int = 1

    @property
    def active(self) -> bool:
        """True when at least one operation is switched on."""
        return self.min_component_mm3 > 0 or self.keep_largest_component or self.fill_holes


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    return ndimage.generate_binary_structure(3, connectivity)


def _class_boxes(labels: np.ndarray, classes: Sequence[int] | None) -> dict[int, tuple[slice, ...]]:
    """``{class: bounding box}`` of the present foreground classes (one pass over the volume)."""
    max_label = int(labels.max()) if labels.size else 0
    if max_label == 0:
        return {}
    if labels.dtype.kind not in "ui":
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    boxes = ndimage.find_objects(labels)
    wanted = set(range(1, max_label + 1)) if classes is None else {int(c) for c in classes if c > 0}
    return {value: box for value, box in enumerate(boxes, start=1) if box is not None and value in wanted}


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Component image and voxel count per component (index 0 = outside)."""
    components, _ = ndimage.label(mask, structure=_structure(connectivity))
    return components, np.bincount(components.ravel())


def remove_small_components(
    labels: np.ndarray,
    *,
    spacing: Sequence[float],
    min_volume_mm3: float,
    classes: Sequence[int] | None = None,
    connectivity: int = 1,
) -> np.ndarray:
    """Set components smaller than ``min_volume_mm3`` to background.

    Args:
        labels: ``(X, Y, Z)`` integer labels (not modified).
        spacing: Voxel size in mm along ``X, Y, Z``.
        min_volume_mm3: Components with ``voxels x voxel volume`` below this are removed.
        classes: Label values to clean (default: all foreground).
        connectivity: Neighbourhood (1 = faces).

    Returns:
        A cleaned copy of ``labels``.
    """
    out = labels.copy()
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    for value, box in _class_boxes(labels, classes).items():
        view = out[box]
        components, counts = _components(view == value, connectivity)
        small = counts * voxel_mm3 < min_volume_mm3
        small[0] = False
        view[small[components]] = 0
    return out


def keep_largest_component(
    labels: np.ndarray, *, classes: Sequence[int] | None = None, connectivity: int = 1
) -> np.ndarray:
    """Keep the largest connected component of each class; the rest becomes background.

    Args:
        labels: ``(X, Y, Z)`` integer labels (not modified).
        classes: Label values to clean (default: all foreground).
        connectivity: Neighbourhood (1 = faces).

    Returns:
        A cleaned copy of ``labels``.
    """
    out = labels.copy()
    for value, box in _class_boxes(labels, classes).items():
        view = out[box]
        components, counts = _components(view == value, connectivity)
        if len(counts) <= 2:
            continue
        counts[0] = 0
        drop = np.ones(len(counts), dtype=bool)
        drop[0] = False
        drop[int(np.argmax(counts))] = False
        view[drop[components]] = 0
    return out


def fill_holes(labels: np.ndarray, *, classes: Sequence[int] | None = None, connectivity: int = 1) -> np.ndarray:
    """Fill background cavities fully enclosed by one class with that class.

    Args:
        labels: ``(X, Y, Z)`` integer labels (not modified).
        classes: Label values whose holes are filled (default: all foreground).
        connectivity: Neighbourhood of the *background* that counts as connected to the outside.

    Returns:
        A copy of ``labels`` with the holes filled.
    """
    out = labels.copy()
    for value, box in _class_boxes(labels, classes).items():
        view = out[box]
        mask = view == value
        filled = ndimage.binary_fill_holes(mask, structure=_structure(connectivity))
        view[filled & ~mask & (view == 0)] = value
    return out


def postprocess_labels(labels: np.ndarray, *, spacing: Sequence[float], options: PostprocessOptions) -> np.ndarray:
    """Apply ``options`` (small components, largest component, holes; in this order).

    Args:
        labels: ``(X, Y, Z)`` integer labels on a grid with voxel ``spacing`` (mm).
        spacing: Voxel size along ``X, Y, Z``.
        options: What to do.

    Returns:
        The cleaned labels (``labels`` itself when nothing is switched on).
    """
    if not options.active:
        return labels
    out = labels
    if options.min_component_mm3 > 0:
        out = remove_small_components(
            out,
            spacing=spacing,
            min_volume_mm3=options.min_component_mm3,
            classes=options.classes,
            connectivity=options.connectivity,
        )
    if options.keep_largest_component:
        out = keep_largest_component(out, classes=options.classes, connectivity=options.connectivity)
    if options.fill_holes:
        out = fill_holes(out, classes=options.classes, connectivity=options.connectivity)
    return out
