"""Polygon rasterising/contouring and the medseg polygon-annotation JSON format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from medseg.errors import InputError
from medseg.io.polygons import (
    fill_polygons,
    mask_to_polygons,
    polygons_to_labels,
    voxel_to_world,
    world_to_voxel,
)
from medseg.io.volume import Geometry

GRID = Geometry.from_itk(
    shape=(30, 24, 5),
    spacing=(0.8, 0.6, 3.0),
    origin=(12.0, -40.0, 7.5),
    direction=np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float),  # rotated 90 degrees in-plane
)


def _random_masks(n: int, shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    masks = []
    for t in range(n):
        noise = rng.random(shape)
        mask = noise > 0.5 if t % 3 == 0 else ndimage.binary_opening(noise > 0.45 + 0.05 * (t % 4))
        if t % 5 == 0:
            mask[0, :] = True  # touches the border
        masks.append(mask)
    return masks


def test_mask_to_polygons_then_fill_gives_back_the_mask_exactly() -> None:
    for mask in _random_masks(120, (37, 29)):
        polygons = mask_to_polygons(mask)
        np.testing.assert_array_equal(fill_polygons(polygons, mask.shape), mask)
        for poly in polygons:  # vertices on voxel-edge mid-points
            assert np.all(np.isclose((poly * 2) % 1, 0)) and np.all(((poly % 1) == 0.5).any(axis=1))
    assert mask_to_polygons(np.zeros((4, 4), bool)) == []


def test_fill_agrees_with_matplotlib_even_odd_away_from_the_boundary() -> None:
    rng = np.random.default_rng(3)
    i, j = np.meshgrid(np.arange(50), np.arange(40), indexing="ij")
    centres = np.column_stack([i.ravel(), j.ravel()]).astype(float)
    for _ in range(100):
        n = int(rng.integers(3, 12))
        angles = np.sort(rng.random(n) * 2 * np.pi)
        radii = rng.random(n) * 18 + 2
        poly = np.column_stack([25 + radii * np.cos(angles), 20 + radii * np.sin(angles)])
        expected = MplPath(poly).contains_points(centres).reshape(50, 40)
        np.testing.assert_array_equal(fill_polygons([poly], (50, 40), tolerance=0.0), expected)
        # The default tolerance only adds centres lying within 0.01 voxel of the outline.
        extra = np.argwhere(fill_polygons([poly], (50, 40)) & ~expected).astype(float)
        assert all(_distance_to_outline(point, poly) <= 0.01 for point in extra)


def _distance_to_outline(point: np.ndarray, poly: np.ndarray) -> float:
    a, b = poly, np.roll(poly, -1, axis=0)
    t = np.clip(np.einsum("ij,ij->i", point - a, b - a) / np.einsum("ij,ij->i", b - a, b - a), 0, 1)
    return float(np.min(np.linalg.norm(a + t[:, None] * (b - a) - point, axis=1)))


def test_opencv_rule_rounds_vertices_and_keeps_the_outline() -> None:
    square = np.array([[2.5, 2.5], [5.5, 2.5], [5.5, 5.5], [2.5, 5.5]])
    assert fill_polygons([square], (10, 10)).sum() == 9  # centres 3..5
    opencv = fill_polygons([square], (10, 10), pixel_rule="opencv")  # vertices -> 3 and 6 (halves up), closed
    assert opencv.sum() == 16 and opencv[3:7, 3:7].all()
    diagonal = np.array([[1.2, 1.0], [7.8, 4.1], [1.0, 6.0]])
    centre, wide = fill_polygons([diagonal], (10, 10)), fill_polygons([diagonal], (10, 10), pixel_rule="opencv")
    assert (centre & ~wide).sum() == 0 and wide.sum() > centre.sum()


def test_world_voxel_mapping_is_the_geometry_affine_in_lps() -> None:
    ijk = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [3, 2, 1]], dtype=float)
    lps = voxel_to_world(ijk, GRID)
    np.testing.assert_allclose(lps[0], GRID.origin)
    np.testing.assert_allclose(lps[1] - lps[0], GRID.direction[:, 0] * 0.8)  # along the first column of direction
    np.testing.assert_allclose(lps[2] - lps[0], GRID.direction[:, 1] * 0.6)
    np.testing.assert_allclose(world_to_voxel(lps, GRID), ijk, atol=1e-9)


def _write(tmp_path: Path, doc: dict, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _square(i0: float, i1: float, j0: float, j1: float) -> list[list[float]]:
    return [[i0, j0], [i1, j0], [i1, j1], [i0, j1]]


def test_semantic_versus_instance_labels(tmp_path: Path) -> None:
    doc = {
        "format": "medseg-polygons",
        "coordinates": "voxel",
        "labels": {"lesion": 2},
        "polygons": [
            {"label": "liver", "object_id": "L", "slice": 1, "points": _square(0.5, 20.5, 0.5, 20.5)},
            {"label": "lesion", "object_id": "a", "slice": 1, "points": _square(2.5, 5.5, 2.5, 5.5)},
            {"label": "lesion", "object_id": "b", "slice": 1, "points": _square(5.5, 8.5, 2.5, 5.5)},  # touches a
            {"label": "lesion", "object_id": "b", "slice": 2, "points": _square(5.5, 8.5, 2.5, 5.5)},
            {"label": "liver", "object_id": "L", "slice": 1, "points": _square(12.5, 16.5, 12.5, 16.5)},  # hole
        ],
    }
    path = _write(tmp_path, doc)
    semantic = polygons_to_labels(path, GRID).semantic
    assert semantic.meta["label_names"] == {2: "lesion", 3: "liver"}
    labels = semantic.array[0]
    assert (labels == 2).sum() == 9 + 9 + 9 and (labels == 3).sum() == 400 - 16 - 18
    assert not labels[13:17, 13:17, 1].any()  # the hole

    result = polygons_to_labels(path, GRID, instances=True)
    ids = result.instances.array[0]
    assert result.instance_table == {
        1: {"class": 3, "class_name": "liver", "object_id": "L"},
        2: {"class": 2, "class_name": "lesion", "object_id": "a"},
        3: {"class": 2, "class_name": "lesion", "object_id": "b"},
    }
    assert (ids == 2).sum() == 9 and (ids == 3).sum() == 18  # touching objects stay distinct
    np.testing.assert_array_equal(result.semantic.array[0], labels)  # same class map either way
    assert result.semantic.geometry is GRID and result.instances.geometry is GRID


def test_overlap_policies_for_polygons(tmp_path: Path) -> None:
    doc = {
        "format": "medseg-polygons",
        "coordinates": "voxel",
        "polygons": [
            {"label": "small", "slice": 0, "points": _square(1.5, 3.5, 1.5, 3.5)},
            {"label": "big", "slice": 0, "points": _square(0.5, 9.5, 0.5, 9.5)},
        ],
    }
    path = _write(tmp_path, doc)
    smaller = polygons_to_labels(path, GRID).semantic.array[0]
    assert (smaller == 1).sum() == 4 and (smaller == 2).sum() == 77
    later = polygons_to_labels(path, GRID, overlap="later").semantic.array[0]
    assert (later == 1).sum() == 0
    with pytest.raises(InputError, match="overlap on slice 0"):
        polygons_to_labels(path, GRID, overlap="error")
    separate = polygons_to_labels(path, GRID, overlap="separate").semantic
    assert separate.array.shape == (2, *GRID.shape) and separate.meta["channels"] == ["small", "big"]


def test_corner_origin_and_world_coordinates(tmp_path: Path) -> None:
    centre = {
        "format": "medseg-polygons",
        "coordinates": "voxel",
        "polygons": [{"label": 5, "slice": 3, "points": _square(1.5, 4.5, 2.5, 6.5)}],
    }
    corner = {
        **centre,
        "pixel_origin": "corner",
        "polygons": [{"label": 5, "slice": 3, "points": _square(2.0, 5.0, 3.0, 7.0)}],
    }
    a = polygons_to_labels(_write(tmp_path, centre, "a.json"), GRID).semantic.array
    b = polygons_to_labels(_write(tmp_path, corner, "b.json"), GRID).semantic.array
    np.testing.assert_array_equal(a, b)
    assert a.sum() == 5 * 12 and a[0, 2:5, 3:7, 3].all()

    # The same square given in LPS millimetres, slightly off the slice plane (0.4 mm < spacing / 4).
    ijk = np.array([[1.5, 2.5, 3.0], [4.5, 2.5, 3.0], [4.5, 6.5, 3.0], [1.5, 6.5, 3.0]])
    lps = voxel_to_world(ijk, GRID) + np.array([0, 0, 0.4])
    world = {
        "format": "medseg-polygons",
        "coordinates": "world",
        "labels": {"x": 5},
        "polygons": [{"label": "x", "points": lps.tolist()}],
    }
    c = polygons_to_labels(_write(tmp_path, world, "c.json"), GRID).semantic.array
    np.testing.assert_array_equal(c, a)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"coordinates": "voxel", "polygons": []}, "not a polygon-annotation file"),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "voxel",
                "polygons": [{"label": "a", "points": [[0, 0], [1, 0], [1, 1]]}],
            },
            "need 'slice'",
        ),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "voxel",
                "polygons": [{"label": "a", "slice": 0, "points": [[0, 0], [1, 0]]}],
            },
            r"polygons\.0\.points",
        ),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "voxel",
                "polygons": [{"label": 0, "slice": 0, "points": [[0, 0], [1, 0], [1, 1]]}],
            },
            r"polygons\.0\.label",
        ),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "voxel",
                "polygons": [{"label": "a", "slice": 9, "points": [[0, 0], [1, 0], [1, 1]]}],
            },
            "slice 9, outside the reference grid",
        ),
        (
            {"format": "medseg-polygons", "coordinates": "voxel", "image_shape": [30, 24, 6], "polygons": []},
            "image of shape",
        ),
        ({"format": "medseg-polygons", "coordinates": "voxel", "bogus": 1, "polygons": []}, "bogus"),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "voxel",
                "polygons": [
                    {"label": "a", "object_id": 1, "slice": 0, "points": [[0, 0], [1, 0], [1, 1]]},
                    {"label": "b", "object_id": 1, "slice": 1, "points": [[0, 0], [1, 0], [1, 1]]},
                ],
            },
            "object_id '1' is used with two labels",
        ),
        (
            {
                "format": "medseg-polygons",
                "coordinates": "world",
                "polygons": [{"label": "a", "points": [[12, -40, 7.5], [13, -40, 7.5], [12, -39, 10.5]]}],
            },
            "not parallel to the image slices",
        ),
    ],
)
def test_invalid_annotation_files_name_the_problem(tmp_path: Path, doc: dict, message: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(InputError, match=message) as info:
        polygons_to_labels(path, GRID)
    assert str(path) in str(info.value)


def test_unreadable_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(InputError, match="not valid JSON"):
        polygons_to_labels(path, GRID)
