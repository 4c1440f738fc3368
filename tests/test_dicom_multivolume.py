"""Multi-volume series (fMRI, diffusion, multi-echo): one series, one 4D volume, dcm2niix's conventions.

Real data: ``dcm_qa_mosaic`` (8 Siemens fMRI mosaic series, 6 volumes each, with dcm2niix's 4D
references).  Diffusion and multi-echo series are written here with pydicom (classic MR slices with
the standard DiffusionBValue / DiffusionGradientOrientation attributes, and real mosaics given the
Siemens private diffusion tags) and compared with a fresh run of the ``dcm2niix`` PyPI package.
Volumes are compared in world space (dcm2niix flips the row axis), b-vectors as world directions.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medseg.errors import InputError
from medseg.io import load_volume, read_dicom_series, reindex_to, scan_dicom
from medseg.io.convert import convert
from medseg.io.diffusion import bvecs_to_world, fsl_bvecs
from medseg.io.info import format_info, gather_info
from medseg.io.volume import LPS_FROM_RAS

MOSAIC_REFS = {
    "ep2d_Asc_2": "2_ep2d_Asc",
    "ep2d_Int_4": "4_ep2d_Int",
    "ep2d_Int_HF_5": "5_ep2d_Int_HF",
    "cmrr_Asc_6": "6_cmrr_Asc",
    "cmrr_Asc_HF_7": "7_cmrr_Asc_HF",
    "cmrr_Int_8": "8_cmrr_Int",
    "cmrr_Int_HF_9": "9_cmrr_Int_HF",
    "ep2d_Asc_HF_10": "10_ep2d_Asc_HF",
}


def _dcm2niix() -> str:
    found = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(found).is_file():
        pytest.skip("dcm2niix is not installed (pip install dcm2niix)")
    return found


def _run_dcm2niix(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([_dcm2niix(), "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)


def _same_voxels(ours: np.ndarray, ours_affine: np.ndarray, ref_path: Path) -> None:
    """``ours`` ``(V, X, Y, Z)`` holds the same voxels as the NIfTI at ``ref_path`` (after exact re-indexing)."""
    from medseg.io import Geometry, Volume

    reference = load_volume(ref_path)
    moved = reindex_to(Volume(ours, Geometry(shape=ours.shape[1:], affine=ours_affine)), reference.geometry)
    assert np.array_equal(moved.array, reference.array.astype(moved.array.dtype))


def _mosaic_root(shared_data: Path) -> Path:
    root = shared_data / "dcm_qa_mosaic"
    if not root.is_dir():
        pytest.skip("dcm_qa_mosaic not available")
    return root


# ----------------------------------------------------------------------------- fMRI mosaics
def test_mosaic_fmri_series_are_one_4d_series_each_equal_to_dcm2niix(shared_data: Path) -> None:
    root = _mosaic_root(shared_data)
    scan = scan_dicom(root / "In")
    assert [s.series_number for s in scan.series] == [2, 4, 5, 6, 7, 8, 9, 10]  # numeric order
    assert all(s.num_volumes == 6 and "#" not in s.key for s in scan.series)
    for folder, ref in MOSAIC_REFS.items():
        volume = read_dicom_series(root / "In" / folder)
        assert volume.channels == 6 and volume.meta["num_volumes"] == 6
        assert [v["acquisition"] for v in volume.meta["volumes"]] == [str(k) for k in range(1, 7)]
        _same_voxels(volume.array, volume.geometry.affine, root / "Ref" / f"{ref}.nii")


def test_convert_fmri_writes_a_4d_nifti_with_dcm2niix_sidecar_fields(shared_data: Path, tmp_path: Path) -> None:
    root = _mosaic_root(shared_data)
    for folder, ref in (("ep2d_Asc_HF_10", "10_ep2d_Asc_HF"), ("cmrr_Int_HF_9", "9_cmrr_Int_HF")):
        # (this upstream folder also holds dcm2niix outputs, converted as volume files)
        (record,) = [r for r in convert(root / "In" / folder, tmp_path / folder) if r["series_key"]]
        assert record["status"] == "done", record["error"]
        out = Path(record["output"])
        assert out.relative_to(tmp_path / folder).parts[:-1] == ("crlab", out.parent.name)  # patient/study/
        image = nib.load(str(out))
        assert image.shape[3] == 6 and image.header.get_xyzt_units() == ("mm", "sec")
        # the volume interval (pixdim[4]) is the repetition time in seconds, as dcm2niix writes it
        reference = nib.load(str(root / "Ref" / f"{ref}.nii"))
        assert image.header.get_zooms()[3] == pytest.approx(reference.header.get_zooms()[3], abs=1e-6)
        sidecar = json.loads(Path(record["sidecar"]).read_text())
        theirs = json.loads((root / "Ref" / f"{ref}.json").read_text())
        for key in (
            "RepetitionTime",
            "EchoTime",
            "FlipAngle",
            "MagneticFieldStrength",
            "ImagingFrequency",
            "Manufacturer",
            "SeriesNumber",
            "SeriesDescription",
            "ProtocolName",
            "SliceThickness",
            "SpacingBetweenSlices",
            "PatientPosition",
            "BodyPart",
            "AcquisitionNumber",
            "ScanningSequence",
            "SequenceVariant",
            "SequenceName",
            "MRAcquisitionType",
            "PixelBandwidth",
            "EchoTrainLength",
            "SoftwareVersions",
            "AcquisitionTime",
        ):
            assert sidecar[key] == theirs[key], key
        assert sidecar["SliceTiming"] == pytest.approx(theirs["SliceTiming"], abs=1e-6)
        assert sidecar["PatientID"] and sidecar["StudyDate"] and sidecar["NumberOfVolumes"] == 6
        assert "PatientName" not in sidecar


# ----------------------------------------------------------------------------- synthetic MR writer
def _mr_series(
    folder: Path,
    volumes: list[dict[str, object]],
    *,
    shape: tuple[int, int, int] = (24, 20, 8),
    manufacturer: str = "Canon_MEC",
) -> None:
    """Classic single-frame MR slices, one volume per entry of ``volumes`` (its attributes are set per slice)."""
    folder.mkdir(parents=True)
    nx, ny, nz = shape
    a, b = np.radians(12), np.radians(-7)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    col = col - row * (row @ col)
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    instance = 0
    for v, extra in enumerate(volumes):
        for z in range(nz):
            instance += 1
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "SYNTH^MR", "MR001", "20240102", "101010"
            ds.Modality, ds.Manufacturer, ds.PatientPosition = "MR", manufacturer, "HFS"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.SeriesNumber, ds.SeriesDescription, ds.ProtocolName = 7, "synthetic", "synthetic"
            ds.InstanceNumber, ds.AcquisitionNumber, ds.EchoNumbers = instance, 1, 1
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            ds.MagneticFieldStrength, ds.RepetitionTime, ds.EchoTime, ds.FlipAngle = 3, 4000, 80, 90
            ds.ImageOrientationPatient = [f"{x:.8f}" for x in (*row, *col)]
            ds.ImagePositionPatient = [f"{x:.6f}" for x in np.array([-50.0, -40.0, -20.0]) + z * 4.0 * normal]
            ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [2.0, 2.5], 4, 4
            ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = ny, nx, 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            for key, value in extra.items():
                setattr(ds, key, value)
            ds.PixelData = (rng.integers(0, 1000, size=(ny, nx)) + 1000 * v + 10 * z).astype(np.uint16).tobytes()
            ds.save_as(folder / f"IM{instance:04d}", enforce_file_format=True)


def _unit(v: np.ndarray) -> list[float]:
    return [float(x) for x in v / np.linalg.norm(v)]


# ----------------------------------------------------------------------------- diffusion
def test_diffusion_series_is_one_4d_volume_with_bval_bvec_like_dcm2niix(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bvals = [0, 1000, 1000, 1000, 0, 2000, 2000]
    volumes: list[dict[str, object]] = []
    for b in bvals:
        gradient = [0.0, 0.0, 0.0] if b == 0 else _unit(rng.normal(size=3))
        volumes.append({"DiffusionBValue": float(b), "DiffusionGradientOrientation": gradient})
    _mr_series(tmp_path / "dwi", volumes)  # one AcquisitionNumber: two b=0 volumes look alike
    (series,) = scan_dicom(tmp_path / "dwi").series
    assert series.num_volumes == 7 and series.volume_b_values == bvals
    records = convert(tmp_path / "dwi", tmp_path / "ours", pattern="%s_%d")
    (record,) = records
    assert record["status"] == "done", record["error"]
    _run_dcm2niix(tmp_path / "dwi", tmp_path / "theirs")
    ours = load_volume(record["output"])
    _same_voxels(ours.array, ours.geometry.affine, tmp_path / "theirs" / "ref.nii")
    our_bvals = np.loadtxt(record["bval"])
    assert np.array_equal(our_bvals, np.loadtxt(tmp_path / "theirs" / "ref.bval"))
    theirs_affine = nib.load(str(tmp_path / "theirs" / "ref.nii")).affine
    world_ours = bvecs_to_world(np.loadtxt(record["bvec"]), ours.geometry.affine)
    world_theirs = bvecs_to_world(np.loadtxt(tmp_path / "theirs" / "ref.bvec"), theirs_affine)
    assert np.allclose(world_ours, world_theirs, atol=1e-4)
    # ... and both are the DICOM gradients (LPS) in RAS.
    lps = np.array([v["DiffusionGradientOrientation"] for v in volumes], dtype=float)
    assert np.allclose(world_ours, lps @ LPS_FROM_RAS.T, atol=1e-5)
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    assert sidecar["DiffusionBValue"] == bvals and sidecar["RepetitionTime"] == 4 and sidecar["EchoTime"] == 0.08
    assert "b-values 0, 1000 x3, 0, 2000 x2" in format_info(gather_info(tmp_path / "dwi"))


def test_siemens_mosaic_diffusion_private_tags_like_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    """Real mosaics given Siemens' private B_value / DiffusionGradientDirection (0019,100C/100E)."""
    root = _mosaic_root(shared_data)
    rng = np.random.default_rng(1)
    folder = tmp_path / "dwi"
    folder.mkdir()
    bvals = [0, 1000, 1000, 0, 2000, 2000]
    for k, path in enumerate(sorted((root / "In" / "ep2d_Asc_2").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        block.add_new(0x0C, "IS", str(bvals[k]))
        if bvals[k]:
            block.add_new(0x0E, "FD", _unit(rng.normal(size=3)))
        ds.save_as(folder / path.name)
    (record,) = convert(folder, tmp_path / "ours")
    assert record["status"] == "done", record["error"]
    _run_dcm2niix(folder, tmp_path / "theirs")
    ours = load_volume(record["output"])
    assert ours.channels == 6
    _same_voxels(ours.array, ours.geometry.affine, tmp_path / "theirs" / "ref.nii")
    assert np.array_equal(np.loadtxt(record["bval"]), np.loadtxt(tmp_path / "theirs" / "ref.bval"))
    theirs_affine = nib.load(str(tmp_path / "theirs" / "ref.nii")).affine
    assert np.allclose(
        bvecs_to_world(np.loadtxt(record["bvec"]), ours.geometry.affine),
        bvecs_to_world(np.loadtxt(tmp_path / "theirs" / "ref.bvec"), theirs_affine),
        atol=1e-4,
    )


def test_fsl_bvecs_follow_the_image_axes() -> None:
    """Same world direction, other voxel order: the bvec components follow the axes and the FSL x flip."""
    g = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    ras_identity = np.diag([1.0, 1.0, 1.0, 1.0])  # det > 0: x negated
    assert np.allclose(fsl_bvecs(g, ras_identity).T, [[0, 0, 0], [1, 0, 0], [0, -0.6, 0.8]])
    flipped = np.diag([-2.0, 1.0, 3.0, 1.0])  # radiological (det < 0), anisotropic spacing
    assert np.allclose(fsl_bvecs(g, flipped).T, [[0, 0, 0], [1, 0, 0], [0, -0.6, 0.8]])
    for affine in (ras_identity, flipped):
        assert np.allclose(bvecs_to_world(fsl_bvecs(g, affine), affine), g @ LPS_FROM_RAS.T)


# ----------------------------------------------------------------------------- multi-echo
def test_multi_echo_series_is_one_series_with_echo_volumes_like_dcm2niix_per_echo(tmp_path: Path) -> None:
    echoes = [{"EchoNumbers": 2, "EchoTime": 25.0}, {"EchoNumbers": 1, "EchoTime": 10.0}]
    _mr_series(tmp_path / "me", echoes)
    (series,) = scan_dicom(tmp_path / "me").series
    assert series.num_volumes == 2
    volume = read_dicom_series(tmp_path / "me")
    assert [v["echo"] for v in volume.meta["volumes"]] == ["1", "2"]  # numeric echo order
    _run_dcm2niix(tmp_path / "me", tmp_path / "theirs")
    per_echo = sorted((tmp_path / "theirs").glob("ref*.nii"))
    assert [p.name for p in per_echo] == ["ref_e1.nii", "ref_e2.nii"]  # dcm2niix: one file per echo
    for k, path in enumerate(per_echo):
        _same_voxels(volume.array[k : k + 1], volume.geometry.affine, path)
    (record,) = convert(tmp_path / "me", tmp_path / "ours")
    sidecar = json.loads(Path(record["sidecar"]).read_text())
    assert sidecar["EchoTime"] == [0.01, 0.025] and sidecar["EchoNumber"] == [1, 2]
    assert nib.load(record["output"]).shape == (24, 20, 8, 2)


# ----------------------------------------------------------------------------- where 3D is required
def test_a_multi_volume_series_is_refused_where_one_3d_volume_is_expected(shared_data: Path) -> None:
    folder = _mosaic_root(shared_data) / "In" / "ep2d_Asc_2"
    with pytest.raises(InputError, match=r"multi-volume DICOM series \(6 volumes"):
        load_volume(folder, allow_4d=False)
    with pytest.raises(InputError, match=r"multi-volume"):
        load_volume(folder, kind="label")
    key = scan_dicom(folder).series[0].key
    third = read_dicom_series(folder, series_uid=f"{key}#vol=3")
    assert third.channels == 1 and np.array_equal(third.array[0], read_dicom_series(folder).array[2])
    with pytest.raises(InputError, match="has 6 volume"):
        read_dicom_series(folder, series_uid=f"{key}#vol=7")


def test_predict_refuses_a_multi_volume_series(shared_data: Path, tiny_model: Path) -> None:
    from medseg.errors import ModelError
    from medseg.infer.predictor import Predictor
    from medseg.models.package import load_model

    volume = read_dicom_series(_mosaic_root(shared_data) / "In" / "ep2d_Asc_2")
    predictor = Predictor(load_model(tiny_model))
    with pytest.raises(ModelError, match=r"has 6 volumes .* choose one with '<UID>#vol=<n>'"):
        predictor.predict(volume)
