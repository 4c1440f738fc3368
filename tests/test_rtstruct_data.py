"""RTSTRUCT reading and writing on real public data in ../shared/data (skipped when absent)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.errors import InputError
from medseg.io import load_volume, read_dicom_series
from medseg.io.polygons import world_to_voxel
from medseg.io.rtstruct import (
    align_to_grid,
    labels_to_rtstruct,
    load_reference_series,
    read_rtstruct,
    rtstruct_to_labels,
)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def _mask(volume, name: str) -> np.ndarray:
    value = next(v for v, n in volume.meta["label_names"].items() if n == name)
    return volume.array[0] == value


def test_dicomrttool_matches_the_shipped_reference_mask(shared_data: Path) -> None:
    folder = shared_data / "rtstruct-dicomrttool-anon"
    rs = folder / "RS_Body_SpinalCord.dcm"
    reference = load_volume(folder / "Mask.nii.gz", kind="label")  # 1 = SpinalCord, 2 = BODY
    series = load_reference_series(folder)
    # Mask.nii.gz is on the DICOM grid itself (same shape and affine, LPS-ordered axes).
    assert reference.geometry.allclose(series.geometry)

    # The tool's rule (vertices rounded to voxel indices, polygon filled with its outline, as
    # OpenCV's fillPoly does) is reproduced by pixel_rule="opencv".
    compat = rtstruct_to_labels(rs, series, pixel_rule="opencv")
    assert compat.geometry.allclose(reference.geometry)
    assert _dice(_mask(compat, "SpinalCord"), reference.array[0] == 1) >= 0.98
    assert _dice(_mask(compat, "BODY"), reference.array[0] == 2) >= 0.98

    # Our default pixel-centre rule: BODY agrees; the small SpinalCord differs because the reference is
    # dilated by about half a voxel - its area exceeds the contour polygons' by ~14%, ours matches them.
    ours = rtstruct_to_labels(rs, series)
    assert _dice(_mask(ours, "BODY"), reference.array[0] == 2) >= 0.99
    cord = read_rtstruct(rs).rois[[r.name for r in read_rtstruct(rs).rois].index("SpinalCord")]
    area = 0.0
    for contour in cord.contours:
        ij = world_to_voxel(contour.points, series.geometry)[:, :2]
        area += 0.5 * abs(np.dot(ij[:, 0], np.roll(ij[:, 1], 1)) - np.dot(ij[:, 1], np.roll(ij[:, 0], 1)))
    assert abs(_mask(ours, "SpinalCord").sum() - area) / area < 0.02
    assert (reference.array[0] == 1).sum() / area > 1.1
    assert 0.90 < _dice(_mask(ours, "SpinalCord"), reference.array[0] == 1) < 0.98


def test_rtutils_mock_reads_and_bad_references_name_the_missing_images(shared_data: Path) -> None:
    folder = shared_data / "rtstruct-rtutils-mock"
    volume = rtstruct_to_labels(folder / "rt.dcm", folder)
    assert volume.geometry.shape == (512, 512, 2)
    assert volume.meta["label_names"] == {1: "ROI-1"}
    per_slice = volume.array[0].sum(axis=(0, 1))
    assert per_slice[0] > 1000 and per_slice[1] == 0  # both contours reference the first slice (z = 60 mm)
    assert any("frame of reference" in w for w in volume.meta["warnings"])  # rt.dcm names another FoR UID
    missing = "2.16.840.1.114362.1.11940992.23790159890.563423471.995.90"
    for name in ("invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"):
        with pytest.raises(InputError, match="missing from the series") as info:
            rtstruct_to_labels(folder / name, folder)
        assert missing in str(info.value) and name in str(info.value)


def test_dicompyler_parses_all_rois_and_fails_clearly_without_the_series(shared_data: Path) -> None:
    folder = shared_data / "rtstruct-dicompyler-core"
    structure_set = read_rtstruct(folder / "rtss.dcm")
    assert len(structure_set.rois) == 10 and structure_set.contour_count == 441
    assert [r.name for r in structure_set.rois][:2] == ["BODY", "Areola"]
    assert structure_set.rois[1].contours == []  # Areola has no contour data
    with pytest.raises(InputError, match=r"97 image\(s\) missing from the series .* and 92 more \(437 contour\(s\)"):
        rtstruct_to_labels(structure_set, folder)
    partial = rtstruct_to_labels(structure_set, folder, missing="skip")
    assert partial.geometry.shape == (512, 512, 1)
    used = {r["name"]: r["contours_used"] for r in partial.meta["rois"]}
    assert used["BODY"] == 4 and sum(used.values()) == 4  # only BODY has contours on the one CT slice present
    assert partial.array.sum() > 10000
    assert any("437 contour(s) left out" in w for w in partial.meta["warnings"])


def _rewrite_with_uids(source: Path, out: Path) -> Path:
    """Copy the anonymised totalseg CT with fresh UIDs (pixel data untouched)."""
    out.mkdir()
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for n, path in enumerate(sorted(source.iterdir())):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.save_as(out / f"ct{n:03d}.dcm")
    return out


def test_totalseg_label_rtstruct_label_round_trip(shared_data: Path, tmp_path: Path) -> None:
    ct = shared_data / "totalseg-tests" / "example_ct_dicom"
    labels = load_volume(shared_data / "totalseg-tests" / "example_seg_dicom.nii.gz", kind="label")
    image = read_dicom_series(ct)

    # The shipped series is anonymised by blanking its UIDs: refuse to write a broken RTSTRUCT.
    with pytest.raises(InputError, match=r"refusing to write an RTSTRUCT.*empty StudyInstanceUID, SeriesInstanceUID"):
        labels_to_rtstruct(labels, load_reference_series(ct, image=image), tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()

    folder = _rewrite_with_uids(ct, tmp_path / "ct")
    reference = load_reference_series(folder)
    assert reference.geometry.allclose(image.geometry)
    out = labels_to_rtstruct(labels, reference, tmp_path / "rs.dcm")  # the NIfTI is LAS: aligned exactly
    back = rtstruct_to_labels(out, reference)
    original = align_to_grid(labels, reference.geometry)[0]
    classes = [int(v) for v in np.unique(original) if v]
    assert len(classes) == 31
    for value in classes:
        dice = _dice(_mask(back, f"label_{value}"), original == value)
        assert dice >= 0.98, (value, dice)
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, check=False)
        text = report.stdout + report.stderr
        assert "RTStructureSet" in text and not [line for line in text.splitlines() if line.startswith("Error")], text
