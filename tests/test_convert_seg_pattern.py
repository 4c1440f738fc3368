"""``medseg convert --pattern`` names, and DICOM SEG read by ``medseg info`` / ``medseg convert``.

SEGs: medseg's own (written over a real PGBM series), dcmqi's ``liver.dcm`` and
``partial_overlaps.dcm`` (with NRRD references written by dcmqi from the same segments) and
highdicom's test files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medseg.errors import ConfigError, InputError
from medseg.io import load_volume, read_dicom_series, read_image_file
from medseg.io.cli import add_annotation_arguments, add_convert_parser, add_info_parser
from medseg.io.convert import convert
from medseg.io.dicom_seg import read_dicom_seg, write_dicom_seg
from medseg.io.grid import place_into
from medseg.io.info import format_info, gather_info
from medseg.io.pattern import check_pattern, expand_pattern
from medseg.io.volume import Volume

STUDY = Path("pgbm-brain-tumor-progression") / "PGBM-001" / "11-19-1991-FH-HEADBrain Protocols-40993"


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="medseg")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    add_annotation_arguments(sub.choices["convert"])
    add_info_parser(sub)
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _link_tree(pairs: list[tuple[Path, Path]]) -> None:
    for src, dest in pairs:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dest)


# ----------------------------------------------------------------------------- pattern
def test_pattern_placeholders_sanitising_and_refusals() -> None:
    header = {
        "PatientID": "../../etc",
        "StudyDate": "20240102",
        "StudyTime": "101010.123",
        "SeriesNumber": "7",
        "SeriesDescription": "T1 post/contrast",
        "ProtocolName": "",
        "SequenceName": "*tfl3d1",
        "Modality": "MR",
        "Manufacturer": "SIEMENS",
    }
    assert expand_pattern("%i/%t/%s_%d", header) == "etc/20240102101010/7_T1_post_contrast"
    assert expand_pattern("%M/%D/%3s-%p-%m", header) == "MR/20240102/007-tfl3d1-Si"
    assert expand_pattern("%x/%s", header) == "unknown/7"  # missing StudyID: never an empty component
    assert expand_pattern("100%%_%s", header) == "100_7"
    for bad, reason in (
        ("/abs/%s", "relative"),
        ("%i/../%s", r"'\.' and '\.\.'"),
        ("%q", "unknown placeholder %q"),
        ("%3d", "width only applies"),
        ("a\\b", "relative"),
    ):
        with pytest.raises(ConfigError, match=reason):
            check_pattern(bad)


def test_convert_pattern_names_sub_folders_and_sidecars(shared_data: Path, tmp_path: Path) -> None:
    study = shared_data / STUDY
    if not study.is_dir():
        pytest.skip("pgbm-brain-tumor-progression not available")
    out = tmp_path / "out"
    assert _run("convert", str(study), str(out), "--pattern", "%M/%i_%D/%5s-%d") == 0
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert names == [
        "MR/PGBM-001_19911119/00011-T1post.nii.gz",
        "MR/PGBM-001_19911119/05364-Mask_Tumor.nii.gz",
        "MR/PGBM-001_19911119/35637-FLAIR_reg.nii.gz",
    ]
    sidecar = json.loads((out / "MR/PGBM-001_19911119/00011-T1post.json").read_text())
    src = pydicom.dcmread(next((study / "11-T1post-03326").iterdir()), stop_before_pixels=True)
    assert sidecar["PatientID"] == "PGBM-001" and sidecar["StudyDate"] == "19911119"
    assert sidecar["Modality"] == "MR" and sidecar["SeriesNumber"] == 11
    assert sidecar["EchoTime"] == pytest.approx(float(src.EchoTime) / 1000)
    assert sidecar["RepetitionTime"] == pytest.approx(float(src.RepetitionTime) / 1000)
    assert sidecar["MagneticFieldStrength"] == pytest.approx(float(src.MagneticFieldStrength))
    assert "PatientName" not in sidecar and "PatientBirthDate" not in sidecar
    with pytest.raises(ConfigError, match=r"'\.' and '\.\.'"):
        convert(study, tmp_path / "bad", pattern="../%i")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- SEG in convert / info
@pytest.fixture(scope="module")
def dcmqi(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = shared_data / "dcmqi-data" / "segmentations"
    if not folder.is_dir():
        pytest.skip("dcmqi-data not available")
    root = tmp_path_factory.mktemp("dcmqi") / "in"
    pairs = [(p, root / "ct" / p.name) for p in sorted((folder / "ct-3slice").iterdir())]
    pairs += [(folder / "liver.dcm", root / "seg" / "liver.dcm")]
    pairs += [(folder / "partial_overlaps.dcm", root / "seg" / "partial_overlaps.dcm")]
    _link_tree(pairs)
    return root


def test_convert_reads_dcmqi_segs_onto_their_referenced_ct(shared_data: Path, dcmqi: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcmqi-data" / "segmentations"
    records = convert(dcmqi, tmp_path / "out", pattern="%s_%d")
    by_name = {r["name"]: r for r in records}
    assert all(r["status"] == "done" for r in records), [r["error"] for r in records]
    ct = read_dicom_series(folder / "ct-3slice")
    liver = load_volume(by_name["1_Liver_Segmentation"]["output"], kind="label")
    assert liver.geometry.allclose(ct.geometry, atol=1e-4)
    expected = place_into(read_image_file(folder / "liver_seg.nrrd", kind="label"), ct.geometry)  # SimpleITK
    assert np.array_equal(liver.array > 0, expected.array > 0)
    sidecar = json.loads(Path(by_name["1_Liver_Segmentation"]["sidecar"]).read_text())
    assert sidecar["labels"] == {"1": "Liver"} and sidecar["grid"] == "referenced series"
    assert sidecar["segments"][0]["type"] == "Liver" and sidecar["segments"][0]["voxels"] == int(expected.array.sum())

    # Overlapping segments: the default policy gives each voxel to the smallest segment covering it.
    masks = _partial_overlap_masks(folder, ct)
    overlaps = load_volume(by_name["100_Segmentation"]["output"], kind="label").array[0]
    sizes = {n: int(m.sum()) for n, m in masks.items()}
    smallest = np.zeros(ct.geometry.shape, dtype=np.int64)
    best = np.full(ct.geometry.shape, np.inf)
    for number, mask in masks.items():
        take = mask & (sizes[number] < best)
        smallest[take], best[take] = number, sizes[number]
    assert np.any(np.sum(list(masks.values()), axis=0) > 1)  # there are overlaps to resolve
    assert np.array_equal(overlaps, smallest)
    names = json.loads(Path(by_name["100_Segmentation"]["sidecar"]).read_text())["labels"]
    assert names == {"1": "GREEN", "2": "ORANGE", "3": "PURPLE", "4": "LIGHT_BLUE", "5": "DARK_BLUE"}

    # --overlap-policy separate: one binary channel per segment.
    out = tmp_path / "sep"
    argv = ["--overlap-policy", "separate", "--reference", str(dcmqi / "ct"), "--pattern", "%s"]
    assert _run("convert", str(dcmqi / "seg" / "partial_overlaps.dcm"), str(out), *argv) == 0
    channels = nib.load(str(out / "100.nii.gz")).get_fdata()
    assert channels.shape == (*ct.geometry.shape, 5)
    for index, number in enumerate(sorted(masks)):
        assert np.array_equal(channels[..., index] > 0, masks[number])


def _partial_overlap_masks(folder: Path, ct: Volume) -> dict[int, np.ndarray]:
    """Segment number -> mask on the CT grid, from dcmqi's NRRDs (each holds some segments as label values)."""
    parts = [
        place_into(read_image_file(folder / f"partial_overlaps-{i}.nrrd", kind="label"), ct.geometry) for i in (1, 2, 3)
    ]
    numbers = sorted({int(v) for p in parts for v in np.unique(p.array) if v})
    return {n: np.any([p.array[0] == n for p in parts], axis=0) for n in numbers}


def test_info_on_a_seg_finds_its_series_or_uses_its_own_frames(dcmqi: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = dcmqi / "seg" / "liver.dcm"
    own = gather_info(seg)  # the CT is not in the SEG's folder
    assert own["kind"] == "seg" and own["segmentation"]["grid"] == "SEG frames"
    found = gather_info(seg, reference=dcmqi / "ct")
    assert found["segmentation"]["grid"] == "referenced series" and found["volume"]["shape"] == [512, 512, 3]
    assert found["segmentation"]["segments"][0]["label"] == "Liver"
    assert found["segmentation"]["segments"][0]["voxels"] == own["segmentation"]["segments"][0]["voxels"] > 0
    assert _run("info", str(seg), "--reference", str(dcmqi / "ct")) == 0
    text = capsys.readouterr().out
    assert "DICOM SEG (BINARY)" in text and "Liver" in text and "grid: referenced series" in text
    assert _run("info", str(dcmqi)) == 0  # a folder lists its SEGs with their segments
    text = capsys.readouterr().out
    assert "DICOM SEG" in text and "GREEN, ORANGE, PURPLE, LIGHT_BLUE, DARK_BLUE" in text


def test_medseg_seg_roundtrips_through_convert_and_info(shared_data: Path, tmp_path: Path) -> None:
    study = shared_data / STUDY
    if not study.is_dir():
        pytest.skip("pgbm-brain-tumor-progression not available")
    t1 = read_dicom_series(study / "11-T1post-03326")
    mask = read_dicom_series(study / "5364-MaskTumor-94345")
    labels = Volume((mask.array > 0).astype(np.uint8), t1.geometry, kind="label")
    labels.array[0, 100:110, 100:110, 10:12] = 2
    root = tmp_path / "archive"
    _link_tree([(p, root / "t1" / p.name) for p in sorted((study / "11-T1post-03326").iterdir())])
    write_dicom_seg(labels, root / "t1", root / "seg" / "seg.dcm", label_names={1: "tumour", 2: "edema"})
    records = convert(root, tmp_path / "out")
    (seg_record,) = [r for r in records if r["source"] == str(root / "seg" / "seg.dcm")]
    back = load_volume(seg_record["output"], kind="label")
    assert back.geometry.allclose(t1.geometry, atol=1e-4) and np.array_equal(back.array, labels.array)
    assert json.loads(Path(seg_record["sidecar"]).read_text())["labels"] == {"1": "tumour", "2": "edema"}
    info = gather_info(root / "seg" / "seg.dcm", reference=root)
    assert [s["label"] for s in info["segmentation"]["segments"]] == ["tumour", "edema"]
    assert "Neoplasm" in format_info(info)


def test_highdicom_testfile_segs_in_info_and_convert(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "highdicom-testfiles"
    if not folder.is_dir():
        pytest.skip("highdicom-testfiles not available")
    data = gather_info(folder / "seg_image_ct_binary_overlap.dcm")
    ds = pydicom.dcmread(folder / "seg_image_ct_binary_overlap.dcm")
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    numbers = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for f in ds.PerFrameFunctionalGroupsSequence
    ]
    for row in data["segmentation"]["segments"]:
        raw = int(sum(frames[i].sum() for i, n in enumerate(numbers) if n == row["number"]))
        assert row["voxels"] == raw > 0
    (record,) = convert(folder / "seg_image_ct_binary_overlap.dcm", tmp_path / "out", overlap="later", pattern="x")
    later = load_volume(record["output"], kind="label").array[0]
    both = read_dicom_seg(folder / "seg_image_ct_binary_overlap.dcm", combine=False).array.astype(bool)
    assert np.array_equal(later == 2, both[1]) and np.array_equal(later == 1, both[0] & ~both[1])
    with pytest.raises(InputError, match="segments overlap"):
        read_dicom_seg(folder / "seg_image_ct_binary_overlap.dcm")
