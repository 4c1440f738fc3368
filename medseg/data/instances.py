"""Semantic labels <-> instances (connected components) <-> panoptic encoding.

Vocabulary used across medseg (evaluation, RTSTRUCT/polygon export, lesion reports):

* A **semantic label map** is an integer array, ``0`` = background, ``c > 0`` = class ``c``.
* An **instance map** is an ``int32`` array of the same shape: ``0`` = background, ``1..N`` = instance
  ids, unique over the whole volume (not per class).  It always travels with an **instance-class
  table** ``dict[int, int]`` mapping each instance id to its class.
* A **panoptic map** packs both into one integer per voxel: ``class_id * 1000 + k`` where ``k`` in
  ``1..999`` numbers the instances *within* that class (the Cityscapes/COCO-style convention);
  ``0`` is background.

Connected components come from :func:`scipy.ndimage.label` with the face (6), face+edge (18) or
face+edge+corner (26) neighbourhood in 3D (4 or 8 in 2D).  Each class is labelled separately, so two
touching structures of different classes are always different instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage

__all__ = [
    "PANOPTIC_DIVISOR",
    "connected_instances",
    "connectivity_structure",
    "from_panoptic",
    "semantic_from_instances",
    "to_panoptic",
]

#: ``panoptic = class_id * PANOPTIC_DIVISOR + instance_within_class``.
PANOPTIC_DIVISOR = 1000

_RANK_BY_CONNECTIVITY = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


def connectivity_structure(connectivity: int, *, ndim: int = 3) -> np.ndarray:
    """Boolean neighbourhood for :func:`scipy.ndimage.label` / binary erosion.

    Args:
        connectivity: Number of neighbours of a voxel: 6, 18 or 26 in 3D; 4 or 8 in 2D.
        ndim: Number of spatial dimensions (2 or 3).

    Returns:
        ``(3,) * ndim`` boolean structuring element.

    Raises:
        ValueError: Unsupported ``ndim`` / ``connectivity`` combination.
    """
    ranks = _RANK_BY_CONNECTIVITY.get(ndim)
    if ranks is None or connectivity not in ranks:
        allowed = sorted(ranks) if ranks else []
        raise ValueError(f"connectivity {connectivity} is not valid in {ndim}D (choose one of {allowed})")
    return ndimage.generate_binary_structure(ndim, ranks[connectivity])


def connected_instances(
    labels: np.ndarray,
    *,
    connectivity: int = 26,
    classes: Iterable[int] | None = None,
) -> tuple[np.ndarray, dict[int, int]]:
    """Split a semantic label map into instances: connected components of each class.

    Args:
        labels: ``(X, Y, Z)`` (or 2D) non-negative integer label map; ``0`` is background.
        connectivity: Neighbourhood of a component (6, 18, 26 in 3D; 4, 8 in 2D).
        classes: Classes to split (default: every non-zero value present).  Voxels of other
            classes are background in the result.

    Returns:
        ``(instance_map, instance_classes)``: an ``int32`` array shaped like ``labels`` with ids
        ``1..N`` (0 = background), numbered class by class in ascending class order and, within a
        class, in raster (C) order of each component's first voxel; and ``{instance_id: class_id}``.

    Raises:
        ValueError: Non-integer or negative labels, or an invalid connectivity.
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ValueError(f"labels must be an integer array, got dtype {labels.dtype}")
    structure = connectivity_structure(connectivity, ndim=labels.ndim)
    instance_map = np.zeros(labels.shape, dtype=np.int32)
    instance_classes: dict[int, int] = {}
    if labels.size == 0:
        return instance_map, instance_classes
    if labels.dtype != np.bool_ and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    work = labels.view(np.uint8) if labels.dtype == np.bool_ else labels
    boxes = ndimage.find_objects(work)  # one bounding box per value 1..max (None if absent), no copy
    present = [c + 1 for c, box in enumerate(boxes) if box is not None]
    wanted = present if classes is None else sorted({int(c) for c in classes} & set(present))
    next_id = 1
    for cls in wanted:
        box = boxes[cls - 1]
        assert box is not None
        mask = work[box] == cls
        components, count = ndimage.label(mask, structure=structure)
        if count == 0:
            continue
        view = instance_map[box]
        view[mask] = components[mask] + (next_id - 1)
        for k in range(count):
            instance_classes[next_id + k] = int(cls)
        next_id += count
    return instance_map, instance_classes


def semantic_from_instances(instance_map: np.ndarray, instance_classes: Mapping[int, int]) -> np.ndarray:
    """Class of every voxel of an instance map.

    Args:
        instance_map: Integer array of instance ids (0 = background).
        instance_classes: ``{instance_id: class_id}`` for every non-zero id present.

    Returns:
        Array shaped like ``instance_map`` with class ids (smallest unsigned dtype that fits).

    Raises:
        ValueError: An id present in the map has no class.
    """
    instance_map = np.asarray(instance_map)
    lut = _class_lut(instance_map, instance_classes)
    max_class = max(instance_classes.values(), default=0)
    dtype = np.uint8 if max_class <= 255 else np.uint16 if max_class <= 65535 else np.uint32
    return lut.astype(dtype)[instance_map]


def to_panoptic(
    instance_map: np.ndarray,
    instance_classes: Mapping[int, int],
    *,
    divisor: int = PANOPTIC_DIVISOR,
) -> np.ndarray:
    """Encode instances as ``class_id * divisor + k`` (``k`` = 1-based index within the class).

    Instances of one class are numbered in ascending order of their instance id.

    Args:
        instance_map: Integer array of instance ids (0 = background).
        instance_classes: ``{instance_id: class_id}`` for every non-zero id present.
        divisor: Encoding base (default 1000): at most ``divisor - 1`` instances per class.

    Returns:
        ``int32`` array (``int64`` when the largest code needs it), 0 = background.

    Raises:
        ValueError: An id without a class, a class id < 1, or more than ``divisor - 1`` instances in
            one class.
    """
    instance_map = np.asarray(instance_map)
    lut_class = _class_lut(instance_map, instance_classes)
    codes = np.zeros(lut_class.shape, dtype=np.int64)
    per_class: dict[int, int] = {}
    for inst in sorted(instance_classes):
        if inst <= 0 or inst >= len(codes):
            continue  # not present in the map
        cls = int(instance_classes[inst])
        if cls < 1:
            raise ValueError(f"instance {inst} has class {cls}; panoptic classes start at 1")
        k = per_class.get(cls, 0) + 1
        if k >= divisor:
            raise ValueError(f"class {cls} has more than {divisor - 1} instances; panoptic encoding cannot hold them")
        per_class[cls] = k
        codes[inst] = cls * divisor + k
    dtype = np.int32 if codes.max(initial=0) <= np.iinfo(np.int32).max else np.int64
    return codes.astype(dtype)[instance_map]


def from_panoptic(
    panoptic: np.ndarray,
    *,
    divisor: int = PANOPTIC_DIVISOR,
) -> tuple[np.ndarray, dict[int, int]]:
    """Decode a panoptic map into an instance map and its instance-class table.

    Args:
        panoptic: Integer array of ``class_id * divisor + k`` codes, 0 = background.
        divisor: Encoding base (default 1000).

    Returns:
        ``(instance_map, instance_classes)``: ``int32`` ids ``1..N`` assigned in ascending code order
        (so class by class, then by ``k``), and ``{instance_id: class_id}``.

    Raises:
        ValueError: Negative codes, or codes whose class (``code // divisor``) or within-class index
            (``code % divisor``) is 0.
    """
    panoptic = np.asarray(panoptic)
    if not np.issubdtype(panoptic.dtype, np.integer):
        raise ValueError(f"panoptic map must be an integer array, got dtype {panoptic.dtype}")
    codes, inverse = np.unique(panoptic, return_inverse=True)
    inverse = inverse.reshape(panoptic.shape)
    if codes.size and codes[0] < 0:
        raise ValueError(f"panoptic codes must be non-negative, found {int(codes[0])}")
    nonzero = codes[codes != 0]
    bad = nonzero[(nonzero // divisor == 0) | (nonzero % divisor == 0)]
    if bad.size:
        raise ValueError(
            f"panoptic code {int(bad[0])} is not class_id * {divisor} + instance (class and instance must be >= 1)"
        )
    ids = np.zeros(codes.shape, dtype=np.int32)
    offset = 1 if codes.size and codes[0] == 0 else 0
    ids[offset:] = np.arange(1, nonzero.size + 1, dtype=np.int32)
    instance_classes = {i + 1: int(code // divisor) for i, code in enumerate(nonzero)}
    return ids[inverse], instance_classes


def _class_lut(instance_map: np.ndarray, instance_classes: Mapping[int, int]) -> np.ndarray:
    """``lut[instance_id] = class_id`` over ``0..max id``; raises if an id present lacks a class."""
    if not np.issubdtype(instance_map.dtype, np.integer):
        raise ValueError(f"instance map must be an integer array, got dtype {instance_map.dtype}")
    if instance_map.size and instance_map.min() < 0:
        raise ValueError("instance ids must be non-negative")
    size = int(instance_map.max(initial=0)) + 1
    lut = np.zeros(size, dtype=np.int64)
    for inst, cls in instance_classes.items():
        if 0 < inst < size:
            lut[inst] = cls
    present = np.flatnonzero(np.bincount(instance_map.ravel(), minlength=size))
    missing = [int(i) for i in present if i != 0 and i not in instance_classes]
    if missing:
        raise ValueError(f"instance ids {missing[:5]} have no class in instance_classes")
    return lut
