"""DICOM SEG and RTSTRUCT over the real series in ../shared/data: written and valid, or one clear refusal.

Every real image series there is segmented with a small two-class label and written as SEG and
RTSTRUCT through :func:`medseg.infer.writers.write_outputs` (the writer of ``predict`` and ``batch``);
each file must pass dicom3tools' ``dciodvfy`` without errors and read back equal to the label.  The
TotalSegmentator CT (UIDs blanked by its anonymiser) must be refused with that reason.  Header noise
highdicom refuses (empty or misspelled SpecificCharacterSet, PatientSex ``U``, ACR-NEMA times, absent
Type 2 attributes, no SliceThickness, ...) is normalised on copies; the files on disk stay untouched.
Siemens mosaics: a SEG of one volume (``#vol=<n>``) references that volume's mosaic image and carries
the slices' own plane positions.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medseg.errors import ExportError, InputError
from medseg.infer.writers import source_headers, write_outputs
from medseg.io import read_dicom_series, scan_dicom
from medseg.io.dicom_headers import clean_identity
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.polygons import voxel_to_world
from medseg.io.rtstruct import labels_to_rtstruct, load_reference_series, rtstruct_to_labels
from medseg.io.volume import Volume

CT3 = Path("dcmqi-data/segmentations/ct-3slice")
MOSAIC = Path("dcm_qa_mosaic/In/ep2d_Asc_2")
SERIES = {
    "pgbm-t1post": Path(
        "pgbm-brain-tumor-progression/PGBM-001/11-19-1991-FH-HEADBrain Protocols-40993/11-T1post-03326"
    ),
    "dcmqi-ct-3slice": CT3,  # SpecificCharacterSet '' (GE)
    "dcmqi-24x38x3": Path("dcmqi-data/segmentations/24x38x3/image"),  # frames too small for JPEG 2000
    "highdicom-ct": Path("highdicom-testfiles/ct_image.dcm"),
    "dicomrttool-ct": Path("rtstruct-dicomrttool-anon"),
    "rtutils-ct": Path("rtstruct-rtutils-mock"),
    "dcm-qa-ts-mosaic": Path("dcm_qa_ts/In"),  # one mosaic saved in 9 transfer syntaxes
}
NAMES = {1: "liver", 2: "tumour"}


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.read_bytes())
    return h.hexdigest()


def _image(shared_data: Path, relative: Path, series_uid: str | None = None) -> tuple[Volume, list[Path]]:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} not available")
    folder = path.parent if path.is_file() else path
    scan = scan_dicom(folder)
    (series,) = [s for s in scan.series if series_uid or path.is_dir() or str(path) in map(str, s.files)]
    image = read_dicom_series(folder, series_uid=series_uid or series.uid)
    return image, [Path(f) for f in series.files]


def _labels(image: Volume) -> Volume:
    nx, ny, nz = image.geometry.shape
    array = np.zeros((1, nx, ny, nz), np.uint8)
    array[0, nx // 5 : nx // 2, ny // 4 : ny // 2, :] = 1
    array[0, nx // 2 : nx // 2 + max(2, nx // 8), ny // 2 : ny // 2 + max(2, ny // 8), nz // 2] = 2
    array[0, nx // 3, ny // 3, 0] = 0  # a hole
    return Volume(array, image.geometry, kind="label")


def _check_outputs(out: Path, image: Volume, labels: Volume) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    seg_file, rt_file = out / "seg.dcm", out / "rtstruct.dcm"
    assert dciodvfy_errors(seg_file) == []
    assert dciodvfy_errors(rt_file) == []
    back = read_dicom_seg(seg_file, reference=image)
    np.testing.assert_array_equal(back.array[0], labels.array[0])
    assert back.meta["label_names"] == NAMES
    reference = load_reference_series(Path(image.meta["slice_files"][0]).parent, image=image)
    contours = rtstruct_to_labels(rt_file, reference)
    lut = {v: next(k for k, n in contours.meta["label_names"].items() if n == name) for v, name in NAMES.items()}
    for value, roi in lut.items():
        np.testing.assert_array_equal(contours.array[0] == roi, labels.array[0] == value)
    return pydicom.dcmread(seg_file), pydicom.dcmread(rt_file)


@pytest.mark.parametrize("name", sorted(SERIES))
def test_seg_and_rtstruct_of_every_real_series_are_valid_and_exact(
    name: str, shared_data: Path, tmp_path: Path
) -> None:
    image, files = _image(shared_data, SERIES[name])
    before = _digest(files)
    labels = _labels(image)
    results = write_outputs(labels, tmp_path, outputs=["seg", "rtstruct"], label_names=NAMES, image=image)
    assert {k: r.error for k, r in results.items()} == {"seg": None, "rtstruct": None}
    seg, rtstruct = _check_outputs(tmp_path, image, labels)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in (seg, rtstruct):  # patient and study copied, never invented
        assert str(ds.PatientID) == str(source.get("PatientID", ""))
        assert str(ds.StudyInstanceUID) == str(source.StudyInstanceUID)
        assert str(ds.PatientName) == str(source.get("PatientName", ""))
    assert _digest(files) == before  # inputs untouched
    if name == "dcmqi-ct-3slice":  # SpecificCharacterSet '' (not valid DICOM): the default repertoire
        assert source.SpecificCharacterSet == "" and "SpecificCharacterSet" not in seg
    if name == "dcmqi-24x38x3":  # openjpeg cannot encode frames under 32 pixels: uncompressed instead
        assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_blanked_uids_stay_a_clear_refusal(shared_data: Path, tmp_path: Path) -> None:
    image, files = _image(shared_data, Path("totalseg-tests/example_ct_dicom"))
    labels = _labels(image)
    results = write_outputs(labels, tmp_path, outputs=["nifti", "seg", "rtstruct"], label_names=NAMES, image=image)
    assert results["nifti"].ok
    for kind in ("seg", "rtstruct"):
        assert "empty SeriesInstanceUID/StudyInstanceUID (anonymised by blanking UIDs?)" in str(results[kind].error)
        assert not (tmp_path / f"{kind}.dcm").exists()
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    with pytest.raises(InputError, match="empty StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID"):
        write_dicom_seg(labels, headers, tmp_path / "seg.dcm", label_names=NAMES)
    with pytest.raises(InputError, match="refusing to write an RTSTRUCT: the reference series has empty"):
        labels_to_rtstruct(labels, files[0].parent, tmp_path / "rt.dcm", label_names=NAMES)


# ----------------------------------------------------------------- header noise
def _noisy_copy(shared_data: Path, folder: Path, case: str) -> Path:
    """The GE CT 3-slice series with real-world header noise, saved as new files."""
    source = shared_data / CT3
    if not source.is_dir():
        pytest.skip(f"{CT3} not available")
    folder.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        if case == "ge-noise":  # SpecificCharacterSet '' as it comes, plus more
            ds.PatientSex = "U"
            ds.PatientBirthDate = "19000000"
            ds.StudyTime = "10:46:07"
            del ds.StudyID
            ds.SliceThickness = ""
        elif case == "latin1-alias":
            ds.SpecificCharacterSet = "ISO IR 100"  # misspelled defined term
            ds.PatientName = "Müller^Jürgen"
            ds.PatientSex = "female"
            ds.StudyDate = "2003-04-17"
            del ds.AccessionNumber
            del ds.SOPClassUID  # only in the file meta, as some exports have it
        elif case == "japanese":
            ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]  # empty first value: the default repertoire
            ds.PatientName = "Yamada^Tarou=山田^太郎"
            ds.PatientSex = ""
            del ds.PatientBirthDate
        ds.save_as(folder / path.name)
    return folder


@pytest.mark.parametrize("case", ["ge-noise", "latin1-alias", "japanese"])
def test_header_noise_is_normalised_on_copies(case: str, shared_data: Path, tmp_path: Path) -> None:
    folder = _noisy_copy(shared_data, tmp_path / "series", case)
    files = sorted(folder.iterdir())
    before = _digest(files)
    image = read_dicom_series(folder)  # the loader accepts all of it
    labels = _labels(image)
    out = tmp_path / "out"
    out.mkdir()
    results = write_outputs(labels, out, outputs=["seg", "rtstruct"], label_names=NAMES, image=image)
    assert {k: r.error for k, r in results.items()} == {"seg": None, "rtstruct": None}
    seg, rtstruct = _check_outputs(out, image, labels)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in (seg, rtstruct):
        assert str(ds.PatientName) == str(source.PatientName)  # characters kept across the charset change
        assert str(ds.PatientID) == str(source.PatientID)
    if case == "ge-noise":
        for ds in (seg, rtstruct):
            assert (ds.PatientSex, ds.PatientBirthDate, ds.StudyTime, ds.StudyID) == ("", "", "104607", "")
        assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == pytest.approx(
            image.geometry.spacing[2]
        )
        cleaned, notes = clean_identity(source)
        assert cleaned is not source and len(notes) == 5  # charset, StudyID, sex, birth date, time
        assert not any("19000000" in note for note in notes)  # a birth date is never quoted
        clean = pydicom.dcmread(shared_data / SERIES["rtutils-ct"] / "ct_1.dcm", stop_before_pixels=True)
        assert clean_identity(clean) == (clean, [])  # a valid header is used as it is
    elif case == "latin1-alias":
        assert seg.SpecificCharacterSet == "ISO_IR 100" and str(seg.PatientName) == "Müller^Jürgen"
        for ds in (seg, rtstruct):
            assert (ds.PatientSex, ds.StudyDate, ds.AccessionNumber) == ("F", "20030417", "")
    else:
        assert list(seg.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
        assert str(seg.PatientName) == "Yamada^Tarou=山田^太郎"
    assert _digest(files) == before  # the files on disk ...
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    snapshot = [h.to_json_dict() for h in headers]
    write_dicom_seg(labels, headers, tmp_path / "again.dcm", label_names=NAMES)
    assert [h.to_json_dict() for h in headers] == snapshot  # ... and the caller's headers are untouched


def test_unknown_source_sop_class_is_one_clear_error(shared_data: Path, tmp_path: Path) -> None:
    image, files = _image(shared_data, CT3)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in headers:
        ds.SOPClassUID = "1.2.826.0.1.3680043.9.9999.1"  # a private SOP class
    with pytest.raises(ExportError, match=r"^patient 99000, study 20030417, series 2: DICOM SEG not written: the "):
        write_dicom_seg(_labels(image), headers, tmp_path / "seg.dcm", label_names=NAMES)
    assert not (tmp_path / "seg.dcm").exists()


# ----------------------------------------------------------------- 4D / mosaics
def test_seg_of_one_mosaic_volume_references_that_volume(shared_data: Path, tmp_path: Path) -> None:
    """A Siemens fMRI series (6 mosaics = 6 volumes): a label of volume 3 is written against volume 3.

    A mosaic holds all 36 slices in one image, so no SEG frame can lie on a source pixel matrix: the
    SEG references the volume's mosaic image (series level) and gives every frame its slice's plane
    position; the RTSTRUCT lists the image once and places contours by their coordinates.
    """
    path = shared_data / MOSAIC
    if not path.is_dir():
        pytest.skip(f"{MOSAIC} not available")
    (series,) = scan_dicom(path).series
    assert series.num_volumes == 6
    image = read_dicom_series(path, series_uid=f"{series.uid}#vol=3")
    labels = _labels(image)
    mosaic = pydicom.dcmread(image.meta["slice_files"][0], stop_before_pixels=True)
    assert Path(image.meta["slice_files"][0]).name == "IM-0001-0003.dcm"
    results = write_outputs(labels, tmp_path, outputs=["seg", "rtstruct"], label_names=NAMES, image=image)
    assert {k: r.error for k, r in results.items()} == {"seg": None, "rtstruct": None}
    seg, rtstruct = _check_outputs(tmp_path, image, labels)

    (referenced,) = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert referenced.ReferencedSOPInstanceUID == mosaic.SOPInstanceUID
    frames = seg.PerFrameFunctionalGroupsSequence
    assert all(len(f.get("DerivationImageSequence", [])) == 0 for f in frames)  # no frame of the mosaic matches
    corners = np.array([[0, 0, k] for k in range(image.geometry.shape[2])], dtype=float)
    slice_positions = {tuple(p) for p in np.round(voxel_to_world(corners, image.geometry), 3)}
    for frame in frames:
        position = tuple(np.round([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], 3))
        assert position in slice_positions
    own = read_dicom_seg(tmp_path / "seg.dcm")  # placed by its own plane positions: the same voxels
    from medseg.io.grid import place_into

    np.testing.assert_array_equal(place_into(own, image.geometry).array[0] > 0, labels.array[0] > 0)

    series_refs = rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
    (only,) = series_refs.RTReferencedSeriesSequence[0].ContourImageSequence
    assert only.ReferencedSOPInstanceUID == mosaic.SOPInstanceUID
    assert all("ContourImageSequence" not in c for item in rtstruct.ROIContourSequence for c in item.ContourSequence)

    # the whole 4D series, or the headers of all its volumes: refused, saying how to pick one
    whole = read_dicom_series(path)
    four_d = Volume(np.zeros((1, *whole.geometry.shape), np.uint8), whole.geometry, kind="label")
    refused = write_outputs(four_d, tmp_path, outputs=["seg", "rtstruct"], label_names=NAMES, image=whole)
    for kind in ("seg", "rtstruct"):
        assert "multi-volume series (6 volumes)" in str(refused[kind].error)
    with pytest.raises(InputError, match=r"holds 6 Siemens mosaics, i\.e\. 6 volumes of a multi-volume series"):
        write_dicom_seg(labels, path, tmp_path / "all.dcm", label_names=NAMES)


def test_seg_of_one_echo_of_a_multi_echo_series_references_that_echo(shared_data: Path, tmp_path: Path) -> None:
    """Classic slices, two echoes on the same positions (one 4D series): volume 2's SEG references echo 2."""
    source = shared_data / CT3
    if not source.is_dir():
        pytest.skip(f"{CT3} not available")
    folder = tmp_path / "echoes"
    folder.mkdir()
    for echo in (1, 2):
        for path in sorted(source.iterdir()):
            ds = pydicom.dcmread(path)
            ds.EchoNumbers = echo
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(echo)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"e{echo}-{path.name}")
    (series,) = scan_dicom(folder).series
    assert series.num_volumes == 2
    image = read_dicom_series(folder, series_uid=f"{series.uid}#vol=2")
    echo2 = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("e2-*")}
    assert {str(h.SOPInstanceUID) for h in source_headers(image)} == echo2
    labels = _labels(image)
    results = write_outputs(labels, tmp_path, outputs=["seg", "rtstruct"], label_names=NAMES, image=image)
    assert {k: r.error for k, r in results.items()} == {"seg": None, "rtstruct": None}
    seg, _ = _check_outputs(tmp_path, image, labels)
    referenced = {str(r.ReferencedSOPInstanceUID) for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == echo2
    with pytest.raises(InputError, match="several volumes of a multi-volume series"):  # both echoes given
        write_dicom_seg(labels, folder, tmp_path / "both.dcm", label_names=NAMES)


def test_character_set_terms_taken_without_asking_highdicom_are_ones_it_accepts() -> None:
    from highdicom.valuerep import _check_specific_character_set

    from medseg.io.dicom_headers import _PLAIN_TERMS, clean_specific_character_set

    for term in _PLAIN_TERMS:
        assert _check_specific_character_set(term) == term
        assert clean_specific_character_set(term) == (term, None)
    assert clean_specific_character_set("ISO 2022 IR 100")[0] == "ISO_IR 100"  # one term needs no extensions
    assert clean_specific_character_set("ISO 2022 IR 149")[0] == "ISO_IR 192"  # Korean: highdicom has no term
    assert clean_specific_character_set(["ISO 2022 IR 6", "ISO 2022 IR 149"])[0] == "ISO_IR 192"
