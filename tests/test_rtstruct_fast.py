"""The fast RTSTRUCT writer: batched contour tracing and pre-encoded ContourSequence equal the slow forms.

The writer traces every slice of a label in one contourpy call (after collapsing background rows
and columns) and encodes the ROIContourSequence bytes itself instead of building one pydicom
Dataset per contour.  These tests pin both to the straightforward forms: per-slice
``mask_to_polygons`` and pydicom's own encoding of the same Datasets.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

import medseg.io.polygons as polygons
from medseg.io import rtstruct
from medseg.io.polygons import fill_polygons, mask_to_polygons, stack_to_polygons
from medseg.io.rtstruct import build_rtstruct, labels_to_rtstruct, load_reference_series, rtstruct_to_labels
from medseg.io.volume import Geometry, Volume
from medseg.sample_data import write_ct_dicom_series

ROI_CONTOURS = Tag(0x3006, 0x0039)


def _stacks() -> list[np.ndarray]:
    """Sparse speckle, dense noise, blobs with holes, empty slices, regions touching the border."""
    rng = np.random.default_rng(11)
    stacks = []
    for n in range(24):
        shape = (int(rng.integers(3, 45)), int(rng.integers(3, 45)), int(rng.integers(1, 6)))
        density = (0.002, 0.03, 0.3, 0.6)[n % 4]
        stack = rng.random(shape) < density
        if n % 3 == 0:
            stack[:, :, rng.integers(0, shape[2])] = False
        if n % 5 == 0:
            stack[0, :, -1] = True
        stacks.append(stack)
    return stacks


@pytest.mark.parametrize("budget", [10**7, 50])
def test_stack_tracing_equals_per_slice_tracing(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(polygons, "_TRACE_PIXELS", budget)  # 50: one slice per contourpy call
    for stack in _stacks():
        traced = stack_to_polygons(stack)
        expected = [(k, poly) for k in range(stack.shape[2]) for poly in mask_to_polygons(stack[:, :, k])]
        assert len(traced) == len(expected)
        for n, (k, poly) in enumerate(expected):
            assert traced.slices[n] == k
            np.testing.assert_array_equal(traced.polygon(n), poly)


def test_sparse_masks_trace_back_exactly() -> None:
    """Collapsing background runs (what makes speckle cheap) keeps the outlines exact."""
    rng = np.random.default_rng(5)
    for n in range(60):
        mask = np.zeros((60, 50), bool)
        mask[rng.integers(0, 60, 12), rng.integers(0, 50, 12)] = True
        if n % 2:
            mask[20:31, 10:14] = True
            mask[25, 11] = False  # a hole
            mask[40, 40:48] = True
        polys = mask_to_polygons(mask)
        np.testing.assert_array_equal(fill_polygons(polys, mask.shape), mask)
        for poly in polys:
            assert np.all(np.isclose((poly * 2) % 1, 0))


def _series(folder: Path) -> Path:
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    geometry = Geometry.from_itk(
        shape=(40, 32, 5), spacing=(0.7, 0.9, 2.5), origin=(-10.0, 5.0, 100.0), direction=direction
    )
    image = Volume(np.zeros((1, 40, 32, 5), np.float32), geometry)
    return write_ct_dicom_series(image, folder, case_id=folder.name)


def _pydicom_encoding(sequence: DicomSequence) -> bytes:
    """ROIContourSequence items rebuilt as plain pydicom Datasets (none of our bytes) and encoded by pydicom."""
    items = []
    for item in sequence:
        fresh = Dataset()
        fresh.ROIDisplayColor = [int(v) for v in item.ROIDisplayColor]
        if "ContourSequence" in item:
            contours = []
            for contour in item.ContourSequence:
                new = Dataset()
                if "ContourImageSequence" in contour:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID = str(contour.ContourImageSequence[0].ReferencedSOPClassUID)
                    ref.ReferencedSOPInstanceUID = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
                    new.ContourImageSequence = DicomSequence([ref])
                new.ContourGeometricType = str(contour.ContourGeometricType)
                new.NumberOfContourPoints = int(contour.NumberOfContourPoints)
                new.ContourNumber = int(contour.ContourNumber)
                data = contour.ContourData  # a long value written as UN comes back as bytes
                text = data.decode("ascii").strip().split("\\") if isinstance(data, bytes) else map(str, data)
                new.ContourData = list(text)  # the text as written
                contours.append(new)
            fresh.ContourSequence = DicomSequence(contours)
        fresh.ReferencedROINumber = int(item.ReferencedROINumber)
        items.append(fresh)
    holder = Dataset()
    holder.ROIContourSequence = DicomSequence(items)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*64 kByte.*")  # pydicom writes a long ContourData as UN too
        write_data_element(fp, holder[ROI_CONTOURS], ["ISO_IR 192"])
    return bytes(fp.getvalue())


def _parsed(element: RawDataElement) -> DicomSequence:
    holder = Dataset()
    holder[ROI_CONTOURS] = element
    holder.set_original_encoding(False, True, "ISO_IR 192")
    return holder.ROIContourSequence


def test_encoded_contours_equal_pydicoms_encoding_and_read_back_exactly(tmp_path: Path) -> None:
    reference = load_reference_series(_series(tmp_path / "ct"))
    rng = np.random.default_rng(3)
    labels = np.zeros((40, 32, 5), np.uint8)
    labels[5:30, 4:28, 1:4] = 1
    labels[10:14, 10:14, 2] = 0  # hole
    labels[(rng.random(labels.shape) < 0.03)] = 2  # speckle
    labels[:, ::2, 4] = 3  # comb
    label = Volume(labels[None], reference.geometry, kind="label")
    names = {1: "body", 2: "speckle", 3: "comb", 4: "empty"}
    raw = build_rtstruct(label, reference, label_names=names, include_empty=True).get_item(ROI_CONTOURS)
    assert isinstance(raw, RawDataElement)
    assert rtstruct._element(0x30060039, b"SQ", raw.value) == _pydicom_encoding(_parsed(raw))

    # A contour longer than a 2-byte length allows (> 64 KB of DS text) is written as UN, as pydicom does.
    comb = np.zeros((1400, 40, 1), bool)
    comb[1:1399:2, :, 0] = True
    comb[:, 0, 0] = True
    traced = stack_to_polygons(comb)
    points = np.column_stack([traced.points * 0.7 - 300.25, np.full(len(traced.points), -3.0)])
    contours = {7: rtstruct._Contours(points, traced.offsets, traced.slices)}
    long_raw = rtstruct._roi_contour_sequence([7], [(1, 2, 3)], contours, [b""])
    assert b"UN" in long_raw.value[:200]
    assert rtstruct._element(0x30060039, b"SQ", long_raw.value) == _pydicom_encoding(_parsed(long_raw))

    out = labels_to_rtstruct(label, reference, tmp_path / "rs.dcm", label_names=names, include_empty=True)
    back = rtstruct_to_labels(out, reference, overlap="later")
    for value, name in names.items():
        roi = next(k for k, n in back.meta["label_names"].items() if n == name)
        np.testing.assert_array_equal(back.array[0] == roi, labels == value)
    assert len(pydicom.dcmread(out).ROIContourSequence) == 4
