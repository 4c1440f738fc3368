"""The phantom generator: deterministic, realistic geometry, committed copy up to date, DICOM == NIfTI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.data.datasets import read_dataset
from medseg.io import load_volume, read_dicom_series
from medseg.sample_data import LABELS, generate_dataset, make_phantom

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "sample_data" / "Dataset001_CTPhantom"


def test_generator_is_deterministic_and_cases_differ() -> None:
    a, b, c = make_phantom(3), make_phantom(3), make_phantom(4)
    assert np.array_equal(a.channels[0].array, b.channels[0].array)
    assert np.array_equal(a.label.array, b.label.array)
    assert a.label.geometry.allclose(b.label.geometry, atol=0)
    assert not c.label.geometry.allclose(a.label.geometry)
    assert not np.array_equal(a.label.array, c.label.array)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_phantom_is_realistic(modality: str) -> None:
    p = make_phantom(1, modality=modality)
    g = p.label.geometry
    sx, sy, sz = g.spacing
    assert sz > 1.3 * max(sx, sy)  # anisotropic
    assert not np.allclose(np.abs(g.direction), np.eye(3), atol=1e-3)  # tilted, not axis-aligned
    assert np.linalg.norm(g.origin) > 10
    counts = np.bincount(p.label.array.ravel(), minlength=4)
    assert all(counts[v] > 50 for v in LABELS.values())  # every class present
    assert len(p.channels) == (1 if modality == "CT" else 2)
    image = p.channels[0].array[0].astype(float)
    label = p.label.array[0]
    # noisy (not piecewise constant) and the lesion differs from the liver around it
    assert image[label == 1].std() > 5
    assert abs(image[label == 3].mean() - image[label == 1].mean()) > 2 * image[label == 1].std()


def test_committed_sample_data_equals_generator(tmp_path: Path) -> None:
    if not COMMITTED.is_dir():
        pytest.skip("no committed sample data in this checkout")
    meta = json.loads((COMMITTED / "dataset.json").read_text())
    info = read_dataset(COMMITTED)
    assert len(info.training) == meta["numTraining"] and len(info.test) == meta["numTest"]
    fresh = generate_dataset(
        tmp_path,
        COMMITTED.name,
        num_train=meta["numTraining"],
        num_test=meta["numTest"],
        seed=meta["medseg_generator"]["seed"],
    )
    for case in [*info.training[:2], info.test[-1]]:
        split = "Tr" if case in info.training else "Ts"
        for committed_path, kind in ((case.images[0], "image"), (case.label, "label")):
            assert committed_path is not None
            folder = ("images" if kind == "image" else "labels") + split
            regenerated = load_volume(fresh / folder / committed_path.name, kind=kind)  # type: ignore[arg-type]
            committed = load_volume(committed_path, kind=kind)  # type: ignore[arg-type]
            assert np.array_equal(committed.array, regenerated.array), committed_path
            assert committed.geometry.allclose(regenerated.geometry, atol=0)


def test_dicom_series_matches_nifti_and_simpleitk(sample_root: Path) -> None:
    series_dir = sample_root / "dicom" / "ct_004"
    nifti = load_volume(sample_root / "Dataset001_CTPhantom" / "imagesTs" / "ct_004_0000.nii.gz")
    ours = read_dicom_series(series_dir)
    assert ours.geometry.allclose(nifti.geometry, atol=1e-4)
    assert np.array_equal(ours.array, nifti.array.astype(np.float32))  # rescale intercept applied
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    ref = reader.Execute()
    assert ref.GetSize() == ours.geometry.shape
    assert np.allclose(ref.GetSpacing(), ours.geometry.spacing, atol=1e-4)
    assert np.allclose(ref.GetOrigin(), ours.geometry.origin, atol=1e-4)
    assert np.allclose(np.reshape(ref.GetDirection(), (3, 3)), ours.geometry.direction, atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(ref).transpose(2, 1, 0), ours.array[0])


def test_dicom_series_with_a_missing_slice_is_rejected(sample_root: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "series"
    shutil.copytree(sample_root / "dicom" / "ct_004", broken)
    (broken / "IM0010").unlink()
    with pytest.raises(Exception, match="non-uniform slice spacing"):
        read_dicom_series(broken)
