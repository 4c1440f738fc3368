"""RTSTRUCT <-> label volumes on hand-made series and structure sets (synthetic, independent of our writer)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medseg.errors import GeometryError, InputError, OutputExistsError
from medseg.io.rtstruct import (
    RTSTRUCT_SOP_CLASS_UID,
    align_to_grid,
    build_rtstruct,
    labels_to_rtstruct,
    load_reference_series,
    read_rtstruct,
    rtstruct_to_labels,
)
from medseg.io.volume import Geometry, Volume
from medseg.sample_data import write_ct_dicom_series

SHAPE = (24, 20, 6)
SPACING = (1.0, 1.0, 2.0)
ORIGIN = (-10.0, 5.0, 100.0)


def _series(folder: Path, *, direction: np.ndarray | None = None, shape=SHAPE, spacing=SPACING) -> Path:
    geometry = Geometry.from_itk(
        shape=shape, spacing=spacing, origin=ORIGIN, direction=np.eye(3) if direction is None else direction
    )
    rng = np.random.default_rng(0)
    image = Volume(array=rng.integers(-100, 100, size=(1, *shape)).astype(np.float32), geometry=geometry)
    return write_ct_dicom_series(image, folder, case_id=folder.name)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _series(tmp_path_factory.mktemp("rt") / "ct")


def _headers(folder: Path) -> list[Dataset]:
    """Slice headers read independently with pydicom, sorted by z (identity orientation)."""
    ds = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]
    return sorted(ds, key=lambda d: float(d.ImagePositionPatient[2]))


def _lps(ij: list[tuple[float, float]], k: float) -> np.ndarray:
    """Voxel (i, j, k) of the identity-oriented test grid -> LPS mm (computed by hand, not via Geometry)."""
    return np.array(
        [[ORIGIN[0] + i * SPACING[0], ORIGIN[1] + j * SPACING[1], ORIGIN[2] + k * SPACING[2]] for i, j in ij]
    )


def _write_rs(
    path: Path,
    series: Path,
    rois: list[tuple[str, list[tuple[np.ndarray, str, int | None]]]],
    *,
    sop_override: dict[int, str] | None = None,
) -> Path:
    """A minimal RTSTRUCT written with pydicom: rois = [(name, [(points LPS (N,3), type, slice index or None)])]."""
    headers = _headers(series)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = headers[0].StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    frame = Dataset()
    frame.FrameOfReferenceUID = headers[0].FrameOfReferenceUID
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    for number, (name, contours) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = headers[0].FrameOfReferenceUID
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [255, 0, 0]
        item.ContourSequence = DicomSequence()
        for points, kind, k in contours:
            c = Dataset()
            if k is not None:
                ref = Dataset()
                ref.ReferencedSOPClassUID = headers[0].SOPClassUID
                ref.ReferencedSOPInstanceUID = (sop_override or {}).get(
                    k, headers[k].SOPInstanceUID if k < len(headers) else "1.2.3.404"
                )
                c.ContourImageSequence = DicomSequence([ref])
            c.ContourGeometricType = kind
            c.NumberOfContourPoints = len(points)
            c.ContourData = [f"{v:.6f}" for v in np.asarray(points).ravel()]
            item.ContourSequence.append(c)
        ds.ROIContourSequence.append(item)
    ds.save_as(path, enforce_file_format=True)
    return path


def _square(i0: float, i1: float, j0: float, j1: float, k: float) -> np.ndarray:
    return _lps([(i0, j0), (i1, j0), (i1, j1), (i0, j1)], k)


def _labels_of(volume: Volume, name: str) -> np.ndarray:
    value = next(v for v, n in volume.meta["label_names"].items() if n == name)
    return volume.array[0] == value


# ---------------------------------------------------------------- reading
def test_square_with_hole_even_odd_and_pixel_centre_rule(series: Path, tmp_path: Path) -> None:
    outer = _square(2.5, 12.5, 3.5, 13.5, 2)  # centres 3..12 x 4..13 inside: 10 x 10
    hole = _square(5.5, 8.5, 6.5, 9.5, 2)  # centres 6..8 x 7..9: 3 x 3 hole
    island = _square(6.6, 7.4, 7.6, 8.4, 2)  # contains centre (7, 8) only: filled again
    rs = _write_rs(
        tmp_path / "rs.dcm",
        series,
        [("ring", [(outer, "CLOSED_PLANAR", 2), (hole, "CLOSED_PLANAR", 2), (island, "CLOSED_PLANAR", 2)])],
    )
    volume = rtstruct_to_labels(rs, series)
    expected = np.zeros(SHAPE, dtype=bool)
    expected[3:13, 4:14, 2] = True
    expected[6:9, 7:10, 2] = False
    expected[7, 8, 2] = True
    assert volume.geometry.shape == SHAPE
    np.testing.assert_array_equal(_labels_of(volume, "ring"), expected)
    assert volume.meta["label_names"] == {1: "ring"}


def test_centres_on_the_contour_are_inside_and_area_is_unbiased(series: Path, tmp_path: Path) -> None:
    on_centres = _square(2, 6, 2, 6, 1)  # vertices on voxel centres: the closed square holds 5 x 5 centres
    triangle = _lps([(10.0, 2.0), (20.0, 2.0), (10.0, 12.0)], 3)  # hypotenuse through centres (i+j=22)
    rs = _write_rs(
        tmp_path / "rs.dcm",
        series,
        [("sq", [(on_centres, "CLOSED_PLANAR", 1)]), ("tri", [(triangle, "CLOSED_PLANAR", 3)])],
    )
    volume = rtstruct_to_labels(rs, series)
    sq = _labels_of(volume, "sq")
    assert sq.sum() == 25 and sq[2:7, 2:7, 1].all()
    tri = _labels_of(volume, "tri")
    i, j = np.nonzero(tri[:, :, 3])
    assert np.all((i >= 10) & (j >= 2) & (i + j <= 22)) and tri.sum() == 66  # 11+10+...+1 centres, boundary included

    # A smooth shape: voxel count within 2% of the polygon's area (the pixel-centre rule is area-unbiased).
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    circle = _lps(list(zip(11.3 + 7.7 * np.cos(t), 9.6 + 7.2 * np.sin(t), strict=True)), 4)
    rs2 = _write_rs(tmp_path / "rs2.dcm", series, [("c", [(circle, "CLOSED_PLANAR", 4)])])
    count = rtstruct_to_labels(rs2, series).array.sum()
    x, y = circle[:, 0], circle[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # mm^2 == voxels (1 mm pixels)
    assert abs(count - area) / area < 0.02


def test_two_contours_on_one_slice_and_overlapping_contours_xor(series: Path, tmp_path: Path) -> None:
    a = _square(1.5, 4.5, 1.5, 4.5, 0)
    b = _square(10.5, 14.5, 10.5, 12.5, 0)
    c = _square(3.5, 6.5, 1.5, 4.5, 1)  # overlaps d on slice 1 -> even-odd removes the overlap
    d = _square(1.5, 4.5, 1.5, 4.5, 1)
    rs = _write_rs(
        tmp_path / "rs.dcm",
        series,
        [("r", [(a, "CLOSED_PLANAR", 0), (b, "CLOSED_PLANAR", 0), (c, "CLOSED_PLANAR", 1), (d, "CLOSED_PLANAR", 1)])],
    )
    mask = _labels_of(rtstruct_to_labels(rs, series), "r")
    assert mask[:, :, 0].sum() == 9 + 8 and mask[2:5, 2:5, 0].all() and mask[11:15, 11:13, 0].all()
    assert mask[:, :, 1].sum() == 6 + 6 - 0 and not mask[4, 2:5, 1].any()  # column i=4 is in both -> hole


def test_contours_between_slices_go_to_the_nearest_slice(series: Path, tmp_path: Path) -> None:
    sq = [(2.5, 5.5), (2.5, 5.5)]
    below = _square(*sq[0], *sq[1], 2.4)  # -> slice 2
    halfway = _square(*sq[0], *sq[1], 3.5)  # exactly between 3 and 4 -> 4 (halves go up)
    far = _square(6.5, 9.5, 6.5, 9.5, 0.7)  # slice 1, 0.3 from its centre
    near = _square(2.5, 5.5, 2.5, 5.5, 1.2)  # slice 1, 0.2 from its centre: this plane wins
    rs = _write_rs(
        tmp_path / "rs.dcm",
        series,
        [
            (
                "r",
                [
                    (below, "CLOSED_PLANAR", None),
                    (halfway, "CLOSED_PLANAR", None),
                    (far, "CLOSED_PLANAR", None),
                    (near, "CLOSED_PLANAR", None),
                ],
            )
        ],
    )
    volume = rtstruct_to_labels(rs, series)
    per_slice = volume.array[0].sum(axis=(0, 1))
    np.testing.assert_array_equal(per_slice, [0, 9, 9, 0, 9, 0])
    assert volume.array[0][3:6, 3:6, 1].all() and not volume.array[0][7:10, 7:10, 1].any()
    assert any("not used" in w for w in volume.meta["warnings"])


def test_open_planar_and_point_contours(series: Path, tmp_path: Path) -> None:
    line = _lps([(2.0, 3.0), (8.0, 3.0)], 2)
    point = _lps([(15.2, 9.7)], 4)
    rs = _write_rs(
        tmp_path / "rs.dcm", series, [("line", [(line, "OPEN_PLANAR", 2)]), ("marker", [(point, "POINT", 4)])]
    )
    volume = rtstruct_to_labels(rs, series)
    line_mask = _labels_of(volume, "line")
    assert line_mask.sum() == 7 and line_mask[2:9, 3, 2].all()
    marker = _labels_of(volume, "marker")
    assert marker.sum() == 1 and marker[15, 10, 4]


def test_open_nonplanar_polyline_crosses_slices(series: Path, tmp_path: Path) -> None:
    line = np.array(_lps([(2.0, 2.0), (2.0, 2.0)], 1))
    line[1, 2] = ORIGIN[2] + 3 * SPACING[2]  # from slice 1 to slice 3 at voxel (2, 2)
    rs = _write_rs(tmp_path / "rs.dcm", series, [("wire", [(line, "OPEN_NONPLANAR", None)])])
    mask = _labels_of(rtstruct_to_labels(rs, series), "wire")
    assert mask.sum() == 3 and mask[2, 2, 1:4].all()


def test_overlap_policies(series: Path, tmp_path: Path) -> None:
    body = _square(0.5, 20.5, 0.5, 16.5, 2)
    organ = _square(4.5, 7.5, 4.5, 7.5, 2)
    rs = _write_rs(
        tmp_path / "rs.dcm", series, [("organ", [(organ, "CLOSED_PLANAR", 2)]), ("BODY", [(body, "CLOSED_PLANAR", 2)])]
    )
    smaller = rtstruct_to_labels(rs, series)  # default: the smaller ROI wins wherever they overlap
    assert _labels_of(smaller, "organ").sum() == 9 and _labels_of(smaller, "BODY").sum() == 20 * 16 - 9
    later = rtstruct_to_labels(rs, series, overlap="later")  # BODY is listed later and covers the organ
    assert _labels_of(later, "organ").sum() == 0
    with pytest.raises(InputError, match="'organ' and 'BODY' overlap on slice 2"):
        rtstruct_to_labels(rs, series, overlap="error")
    separate = rtstruct_to_labels(rs, series, overlap="separate")
    assert separate.array.shape == (2, *SHAPE) and separate.meta["channels"] == ["organ", "BODY"]
    assert separate.array[0].sum() == 9 and separate.array[1].sum() == 320
    only = rtstruct_to_labels(rs, series, rois=["body"])
    assert only.meta["label_names"] == {1: "BODY"} and only.array.sum() == 320
    with pytest.raises(InputError, match="no ROI named 'liver'"):
        rtstruct_to_labels(rs, series, rois=["liver"])


def test_missing_references_are_named_or_skipped(series: Path, tmp_path: Path) -> None:
    ok = _square(2.5, 5.5, 2.5, 5.5, 1)
    missing = _square(2.5, 5.5, 2.5, 5.5, 3)
    outside = _square(2.5, 5.5, 2.5, 5.5, 9)
    rs = _write_rs(
        tmp_path / "rs.dcm",
        series,
        [("r", [(ok, "CLOSED_PLANAR", 1), (missing, "CLOSED_PLANAR", 3), (outside, "CLOSED_PLANAR", None)])],
        sop_override={3: "1.2.826.0.1.3680043.8.498.999"},
    )
    with pytest.raises(InputError, match=r"SOP Instance UID\(s\) 1\.2\.826\.0\.1\.3680043\.8\.498\.999") as info:
        rtstruct_to_labels(rs, series)
    assert "1 contour(s) lie outside the series" in str(info.value) and str(rs) in str(info.value)
    partial = rtstruct_to_labels(rs, series, missing="skip")
    assert partial.array[0].sum(axis=(0, 1)).tolist() == [0, 9, 0, 0, 0, 0]
    assert any("2 contour(s) left out" in w for w in partial.meta["warnings"])


def test_tilted_contour_and_bad_files_are_refused(series: Path, tmp_path: Path) -> None:
    tilted = _lps([(2, 2), (8, 2), (8, 8)], 2)
    tilted[2, 2] += 1.5  # 0.75 slice out of plane
    rs = _write_rs(tmp_path / "rs.dcm", series, [("t", [(tilted, "CLOSED_PLANAR", None)])])
    with pytest.raises(InputError, match="not parallel to the image slices"):
        rtstruct_to_labels(rs, series)
    ct = next(series.iterdir())
    with pytest.raises(InputError, match="not an RTSTRUCT"):
        read_rtstruct(ct)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="cannot read DICOM"):
        read_rtstruct(tmp_path / "junk.dcm")


# ---------------------------------------------------------------- writing
def _blobs(shape: tuple[int, int, int]) -> np.ndarray:
    """Label map with holes, islands, touching classes and a structure on the border."""
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    labels = np.zeros(shape, dtype=np.uint8)
    ring = (np.hypot(i - 9, j - 9) < 7) & (np.hypot(i - 9, j - 9) >= 3) & (k >= 1) & (k <= 4)
    labels[ring] = 1
    labels[(np.hypot(i - 9, j - 9) < 1.5) & (k == 2)] = 1  # island in the hole
    labels[(i >= 15) & (j <= 6) & (k <= 3)] = 2  # touches the border and class 1's box
    labels[(i + j) % 7 == 0 & (k == 5)] = 3
    labels[0, :, 5] = 3
    return labels


def test_round_trip_is_exact_on_an_oblique_grid_and_references_the_right_images(tmp_path: Path) -> None:
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    tilt = np.array([[1, 0, 0], [0, np.cos(0.3), -np.sin(0.3)], [0, np.sin(0.3), np.cos(0.3)]])
    folder = _series(tmp_path / "oblique", direction=tilt @ rot, spacing=(0.7, 0.9, 2.5))
    reference = load_reference_series(folder)
    labels = Volume(array=_blobs(SHAPE)[None], geometry=reference.geometry, kind="label")
    out = labels_to_rtstruct(labels, reference, tmp_path / "rs.dcm", label_names={1: "ring", 2: "corner", 3: "stripes"})
    back = rtstruct_to_labels(out, reference)
    assert back.geometry.allclose(reference.geometry)
    lut = {
        v: next(k for k, n in back.meta["label_names"].items() if n == name)
        for v, name in ((1, "ring"), (2, "corner"), (3, "stripes"))
    }
    for value, roi in lut.items():
        np.testing.assert_array_equal(back.array[0] == roi, labels.array[0] == value)

    # Independent check with pydicom: every contour lies in the plane of the slice it references.
    ds = pydicom.dcmread(out)
    by_uid = {h.SOPInstanceUID: h for h in _headers_any(folder)}
    for item in ds.ROIContourSequence:
        for contour in item.ContourSequence:
            header = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            iop = np.asarray(header.ImageOrientationPatient, dtype=float)
            normal = np.cross(iop[:3], iop[3:])
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            assert np.allclose(
                points @ normal, np.dot(np.asarray(header.ImagePositionPatient, dtype=float), normal), atol=1e-3
            )
            assert contour.NumberOfContourPoints == len(points)


def _headers_any(folder: Path) -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]


def test_written_rtstruct_copies_patient_and_study_and_gets_new_uids(series: Path, tmp_path: Path) -> None:
    reference = load_reference_series(series)
    labels = Volume(
        array=_blobs(SHAPE)[None],
        geometry=reference.geometry,
        kind="label",
        meta={"sidecar": {"labels": {"0": "background", "1": "ring", "2": "corner"}}},
    )
    out = labels_to_rtstruct(labels, series, tmp_path / "rs.dcm")
    ds = pydicom.dcmread(out)
    ct = _headers(series)[0]
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyID",
        "FrameOfReferenceUID",
    ):
        assert str(ds.get(keyword)) == str(ct.get(keyword)), keyword
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS_UID and ds.Modality == "RTSTRUCT"
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID and ds.SOPInstanceUID not in {
        h.SOPInstanceUID for h in _headers(series)
    }
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["ring", "corner", "label_3"]
    refs = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == ct.SeriesInstanceUID and len(refs.ContourImageSequence) == SHAPE[2]
    assert len(ds.RTROIObservationsSequence) == 3
    with pytest.raises(OutputExistsError):
        labels_to_rtstruct(labels, series, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rs.dcm"]  # no temporary left behind


def test_labels_on_a_flipped_grid_are_aligned_exactly_and_other_grids_refused(series: Path, tmp_path: Path) -> None:
    reference = load_reference_series(series)
    g = reference.geometry
    labels = _blobs(SHAPE)
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    flip[1, 3] = SHAPE[1] - 1  # index j -> (ny - 1 - j): same voxel centres, axis 1 reversed (LPS -> LAS)
    flipped = Volume(
        array=labels[None, :, ::-1, :], geometry=Geometry(shape=SHAPE, affine=g.affine @ flip), kind="label"
    )
    np.testing.assert_array_equal(align_to_grid(flipped, g)[0], labels)
    permuted = Volume(
        array=labels.transpose(1, 0, 2)[None],
        geometry=Geometry(shape=(SHAPE[1], SHAPE[0], SHAPE[2]), affine=g.affine[:, [1, 0, 2, 3]]),
        kind="label",
    )
    np.testing.assert_array_equal(align_to_grid(permuted, g)[0], labels)
    shifted = Volume(
        array=labels[None],
        geometry=Geometry(
            shape=SHAPE, affine=g.affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
        ),
        kind="label",
    )
    with pytest.raises(GeometryError, match="not on the reference series grid"):
        build_rtstruct(shifted, reference)


def test_writer_refuses_series_with_empty_uids(series: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank"
    blank.mkdir()
    for p in sorted(series.iterdir()):
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID = ""
        ds.SeriesInstanceUID = ""
        ds.save_as(blank / p.name)
    labels = Volume(array=_blobs(SHAPE)[None], geometry=load_reference_series(blank).geometry, kind="label")
    with pytest.raises(
        InputError, match=r"refusing to write an RTSTRUCT.*SeriesInstanceUID, SOPInstanceUID of 6 slice"
    ) as info:
        labels_to_rtstruct(labels, blank, tmp_path / "rs.dcm")
    assert str(blank) in str(info.value)
    assert not (tmp_path / "rs.dcm").exists()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_written_rtstruct_passes_dciodvfy(series: Path, tmp_path: Path) -> None:
    labels = Volume(array=_blobs(SHAPE)[None], geometry=load_reference_series(series).geometry, kind="label")
    out = labels_to_rtstruct(labels, series, tmp_path / "rs.dcm", label_names={1: "ring", 2: "corner", 3: "stripes"})
    result = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, check=False)
    report = result.stdout + result.stderr
    assert "RTStructureSet" in report
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report
