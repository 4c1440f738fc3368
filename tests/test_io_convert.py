"""``medseg convert`` / ``medseg info`` parsers, and bad volume files (typed errors, no partial output)."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom_fakes import phantom, write_series

from medseg.errors import InputError
from medseg.io import load_volume, read_dicom_series
from medseg.io.convert import add_convert_parser, convert
from medseg.io.info import add_info_parser


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="medseg")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    add_info_parser(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_convert_a_study_writes_one_nifti_and_sidecar_per_series(shared_data: Path, tmp_path: Path) -> None:
    studies = sorted((shared_data / "pgbm-brain-tumor-progression").glob("*/*"))
    if not studies:
        pytest.skip("pgbm data not available")
    study = studies[0]
    out = tmp_path / "out"
    assert _run("convert", str(study), str(out)) == 0
    niftis = sorted(out.rglob("*.nii.gz"))
    assert len(niftis) == 3 and len(list(out.rglob("*.json"))) == 3
    assert {p.parent.relative_to(out).parts[0] for p in niftis} == {study.parent.name}  # patient/study/ sub-folders
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temporary files left
    for nifti in niftis:
        sidecar = json.loads(nifti.with_name(nifti.name.replace(".nii.gz", ".json")).read_text())
        (folder,) = [p for p in study.iterdir() if p.is_dir() and sidecar["source"] == str(p)]
        dicom = read_dicom_series(folder)
        assert sidecar["series_uid"] == dicom.meta["series_uid"] and sidecar["modality"] == "MR"
        assert sidecar["shape"] == list(dicom.geometry.shape) and sidecar["slice_issues"] == []
        assert sidecar["spacing"] == pytest.approx(list(dicom.geometry.spacing))
        assert sidecar["description"] in nifti.name
        written = load_volume(nifti)
        assert written.geometry.allclose(dicom.geometry, atol=1e-4)
        assert np.array_equal(written.array, dicom.array)
        assert nib.load(str(nifti)).get_data_dtype().kind in "iu"  # integral MR stored as integers


def test_convert_refuses_to_overwrite_and_leaves_outputs_untouched(tmp_path: Path) -> None:
    write_series(phantom(), tmp_path / "dicom")
    out = tmp_path / "out"
    assert _run("convert", str(tmp_path / "dicom"), str(out)) == 0
    (nifti,) = out.rglob("*.nii.gz")
    before = nifti.read_bytes()
    assert _run("convert", str(tmp_path / "dicom"), str(out)) == 1
    assert nifti.read_bytes() == before
    assert _run("convert", str(tmp_path / "dicom"), str(out), "--overwrite") == 0


def test_convert_single_files_and_volume_files(shared_data: Path, tmp_path: Path) -> None:
    records = convert(shared_data / "dcm_qa_ts" / "In" / "7.dcm", tmp_path / "mosaic")
    assert [r["status"] for r in records] == ["done"]
    assert nib.load(records[0]["output"]).shape == (64, 64, 35)
    records = convert(shared_data / "totalseg-tests" / "example_ct_sm.nii.gz", tmp_path / "nifti")
    assert records[0]["name"] == "example_ct_sm" and records[0]["status"] == "done"
    again = load_volume(records[0]["output"])
    original = load_volume(shared_data / "totalseg-tests" / "example_ct_sm.nii.gz")
    assert again.geometry.allclose(original.geometry, atol=1e-5) and np.array_equal(again.array, original.array)


def test_convert_continues_past_a_bad_series_without_partial_output(tmp_path: Path) -> None:
    write_series(phantom(seed=1), tmp_path / "in" / "good")
    bad = write_series(phantom(seed=2), tmp_path / "in" / "bad")
    bad[3].unlink()  # missing slice
    nifti = tmp_path / "in" / "broken.nii.gz"
    nifti.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    records = convert(tmp_path / "in", tmp_path / "out")
    status = sorted((r["status"], r["error"] is None) for r in records)
    assert status == [("done", True), ("failed", False), ("failed", False)]
    errors = " | ".join(r["error"] for r in records if r["error"])
    assert "missing slice" in errors and "broken.nii.gz" in errors
    assert len([p for p in (tmp_path / "out").rglob("*") if p.is_file()]) == 2  # the good series' NIfTI and sidecar


def test_convert_nothing_to_convert_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no DICOM image series or volume files to convert \(1 not DICOM\)"):
        convert(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_info_lists_series_and_describes_files(shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run("info", str(shared_data / "pgbm-brain-tumor-progression" / "PGBM-001")) == 0
    text = capsys.readouterr().out
    assert "6 DICOM series" in text and "T1post" in text and "260x320x25" in text and "0.6875x0.6875x6.5" in text
    assert _run("info", "--json", str(shared_data / "totalseg-tests" / "example_ct_dicom")) == 0
    data = json.loads(capsys.readouterr().out)
    (series,) = data["series"]
    assert series["key"].startswith("nouid-") and series["num_slices"] == 20 and series["orientation_code"] == "LPS"
    assert data["volume"]["shape"] == [512, 512, 20] and data["volume"]["value_range"][0] == -1024
    assert _run("info", "--json", str(shared_data / "totalseg-tests" / "example_ct_sm.nii.gz")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["volume"]["shape"] == [122, 101, 30] and data["volume"]["orientation"] == "RAS"
    assert set(data["volume"]) >= {"spacing", "origin_lps", "direction_lps", "value_range"}


# ----------------------------------------------------------------------------- bad volume files
def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.0, 1.0])), str(path))
    return path


def test_bad_volume_files_are_typed_errors_naming_the_file(tmp_path: Path) -> None:
    good = _nifti(tmp_path / "good.nii.gz", np.ones((4, 5, 6), np.float32))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header at all" * 20)[:-8] + b"\x00" * 8)
    with_nan = np.ones((4, 5, 6), np.float32)
    with_nan[1, 2, 3] = np.nan
    cases = {
        truncated: "cannot read NIfTI",
        corrupt: "cannot read NIfTI",
        _nifti(tmp_path / "nan.nii.gz", with_nan): "NaN",
        _nifti(tmp_path / "flat.nii.gz", np.ones((4, 5), np.float32)): "expected a 3D volume, got 2D",
    }
    for path, reason in cases.items():
        with pytest.raises(InputError, match=reason) as info:
            load_volume(path)
        assert info.value.path == str(path)
    four_d = _nifti(tmp_path / "4d.nii.gz", np.ones((4, 5, 6, 3), np.float32))
    assert load_volume(four_d).channels == 3  # as channels when allowed
    with pytest.raises(InputError, match="expected a 3D volume") as info:
        load_volume(four_d, allow_4d=False)
    assert info.value.path == str(four_d)


def test_mhd_reads_with_its_raw_file_and_names_a_missing_one(tmp_path: Path) -> None:
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.6, 2.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "vol.mhd"))
    volume = load_volume(tmp_path / "vol.mhd")
    assert np.array_equal(volume.array[0], array.transpose(2, 1, 0))
    assert volume.geometry.origin == pytest.approx((1.0, 2.0, 3.0))
    (tmp_path / "vol.raw").unlink()
    with pytest.raises(InputError, match=r"data file vol\.raw .* does not exist") as info:
        load_volume(tmp_path / "vol.mhd")
    assert info.value.path == str(tmp_path / "vol.mhd")
