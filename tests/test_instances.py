"""Semantic -> instance -> panoptic conversions (medseg.data.instances)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medseg.data.instances import (
    PANOPTIC_DIVISOR,
    connected_instances,
    connectivity_structure,
    from_panoptic,
    semantic_from_instances,
    to_panoptic,
)


def _diagonal_pair() -> np.ndarray:
    """Class 1: two voxels touching by a face, an edge pair and a corner pair; class 2 touching class 1."""
    labels = np.zeros((8, 8, 8), dtype=np.uint8)
    labels[1, 1, 1] = 1
    labels[2, 2, 1] = 1  # edge neighbour of (1,1,1)
    labels[3, 3, 2] = 1  # corner neighbour of (2,2,1)
    labels[6, 6, 6] = 1  # isolated
    labels[6, 6, 5] = 2  # face neighbour of class 1 but another class
    return labels


@pytest.mark.parametrize(("connectivity", "expected"), [(6, 4), (18, 3), (26, 2)])
def test_connectivity_decides_how_many_components(connectivity: int, expected: int) -> None:
    labels = _diagonal_pair()
    inst, classes = connected_instances(labels, connectivity=connectivity, classes=[1])
    assert len(classes) == expected
    assert set(classes.values()) == {1}
    assert set(np.unique(inst)) == set(range(expected + 1))
    assert np.array_equal(inst > 0, labels == 1)


def test_classes_are_split_separately_and_numbered_in_order() -> None:
    labels = _diagonal_pair()
    inst, classes = connected_instances(labels)
    assert classes == {1: 1, 2: 1, 3: 2}
    # raster order of the first voxel within a class, then the next class
    assert inst[1, 1, 1] == 1 and inst[3, 3, 2] == 1 and inst[6, 6, 6] == 2 and inst[6, 6, 5] == 3
    # agrees with scipy run class by class on the whole volume
    for cls in (1, 2):
        ref, n = ndimage.label(labels == cls, structure=np.ones((3, 3, 3)))
        ids = sorted(i for i, c in classes.items() if c == cls)
        assert n == len(ids)
        for k, inst_id in enumerate(ids, start=1):
            assert np.array_equal(inst == inst_id, ref == k)


def test_semantic_roundtrip_on_random_labels() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(20, 18, 16)).astype(np.uint16)
    inst, classes = connected_instances(labels, connectivity=6)
    assert inst.dtype == np.int32
    assert np.array_equal(semantic_from_instances(inst, classes), labels)
    # unknown class list entries are ignored; absent classes produce nothing
    inst2, classes2 = connected_instances(labels, classes=[3, 7])
    assert set(classes2.values()) == {3}
    assert np.array_equal(inst2 > 0, labels == 3)


def test_panoptic_roundtrip_and_codes() -> None:
    labels = _diagonal_pair()
    inst, classes = connected_instances(labels)
    pan = to_panoptic(inst, classes)
    assert pan.dtype == np.int32
    assert set(np.unique(pan)) == {0, 1001, 1002, 2001}
    assert pan[6, 6, 6] == 1 * PANOPTIC_DIVISOR + 2
    back, back_classes = from_panoptic(pan)
    assert back_classes == classes
    assert np.array_equal(back, inst)


def test_from_panoptic_rejects_codes_without_class_or_instance() -> None:
    with pytest.raises(ValueError, match="class_id"):
        from_panoptic(np.array([[0, 5]]))
    with pytest.raises(ValueError, match="class_id"):
        from_panoptic(np.array([[0, 2000]]))
    with pytest.raises(ValueError, match="non-negative"):
        from_panoptic(np.array([[-1, 1001]]))


def test_to_panoptic_refuses_overflow_and_missing_classes() -> None:
    inst = np.arange(1, 1001, dtype=np.int32).reshape(10, 10, 10)
    classes = dict.fromkeys(range(1, 1001), 1)
    with pytest.raises(ValueError, match="more than 999"):
        to_panoptic(inst, classes)
    with pytest.raises(ValueError, match="no class"):
        to_panoptic(inst, {1: 1})


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="connectivity 10"):
        connectivity_structure(10)
    with pytest.raises(ValueError, match="integer"):
        connected_instances(np.zeros((3, 3, 3), dtype=np.float32))
    assert connectivity_structure(8, ndim=2).sum() == 9
    inst, classes = connected_instances(np.zeros((4, 4, 4), dtype=np.uint8))
    assert classes == {} and not inst.any()
