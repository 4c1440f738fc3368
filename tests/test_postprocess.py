"""Post-processing on hand-made components, with anisotropic spacing."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.infer.postprocess import (
    PostprocessOptions,
    fill_holes,
    keep_largest_component,
    postprocess_labels,
    remove_small_components,
)


def _scene() -> np.ndarray:
    """Class 1: a 4x4x2 block (32 voxels) and a 2x2x1 speck (4 voxels); class 2: 3x3x3 (27) and 2x2x2 (8)."""
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[1:5, 1:5, 1:3] = 1
    labels[10:12, 10:12, 5] = 1
    labels[14:17, 1:4, 1:4] = 2
    labels[1:3, 15:17, 6:8] = 2
    return labels


def test_small_components_are_measured_in_mm3_with_the_grid_spacing() -> None:
    labels = _scene()
    # anisotropic voxels of 0.5 x 0.5 x 4 mm = 1 mm^3: the 4- and 8-voxel pieces are 4 and 8 mm^3
    cleaned = remove_small_components(labels, spacing=(0.5, 0.5, 4.0), min_volume_mm3=10.0)
    assert not cleaned[10:12, 10:12, 5].any() and not cleaned[1:3, 15:17, 6:8].any()
    assert np.array_equal(cleaned[1:5, 1:5, 1:3], labels[1:5, 1:5, 1:3])
    assert np.sum(cleaned == 2) == 27
    # the same threshold with 3 mm^3 voxels removes nothing (speck = 12 mm^3, small cube = 24 mm^3)
    assert np.array_equal(remove_small_components(labels, spacing=(1.0, 1.0, 3.0), min_volume_mm3=10.0), labels)
    # only the classes asked for
    only2 = remove_small_components(labels, spacing=(0.5, 0.5, 4.0), min_volume_mm3=10.0, classes=(2,))
    assert only2[10:12, 10:12, 5].all() and not only2[1:3, 15:17, 6:8].any()
    assert np.array_equal(labels, _scene())  # input untouched


def test_largest_component_per_class_and_connectivity() -> None:
    labels = _scene()
    kept = keep_largest_component(labels)
    assert np.sum(kept == 1) == 32 and np.sum(kept == 2) == 27
    # two voxels touching only at an edge: separate with face connectivity, one object with 18-connectivity
    diag = np.zeros((6, 6, 6), dtype=np.uint8)
    diag[1:3, 1:3, 1:3] = 3
    diag[3, 3, 2] = 3
    assert np.sum(keep_largest_component(diag) == 3) == 8
    assert np.sum(keep_largest_component(diag, connectivity=2) == 3) == 9


def test_fill_holes_only_fills_enclosed_background() -> None:
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[2:10, 2:10, 2:10] = 1
    labels[4:6, 4:6, 4:6] = 0  # enclosed background cavity -> filled
    labels[6:8, 6:8, 6:8] = 2  # another class inside -> kept
    labels[2:10, 8:10, 5] = 0  # a notch open to the outside -> not a hole
    labels[2:10, 8, 5] = 0
    filled = fill_holes(labels)
    assert np.all(filled[4:6, 4:6, 4:6] == 1)
    assert np.all(filled[6:8, 6:8, 6:8] == 2)
    assert np.all(filled[2:10, 8:10, 5] == 0)
    assert np.array_equal(filled[labels != 0], labels[labels != 0])


def test_options_apply_in_order_and_off_is_identity() -> None:
    labels = _scene()
    assert postprocess_labels(labels, spacing=(1, 1, 1), options=PostprocessOptions()) is labels
    options = PostprocessOptions(min_component_mm3=5.0, keep_largest_component=True, fill_holes=True)
    out = postprocess_labels(labels, spacing=(1.0, 1.0, 1.0), options=options)
    assert np.sum(out == 1) == 32 and np.sum(out == 2) == 27
    with pytest.raises(TypeError, match="integers"):
        keep_largest_component(labels.astype(np.float32))
