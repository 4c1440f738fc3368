"""Helpers that write small, realistic DICOM series for the DICOM tests (no tests here).

Slices are written with pydicom as the scanners do (one file per slice, no suffix,
InstanceNumber deliberately not in spatial order); each test then damages or varies them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg.io import Geometry, Volume


def oblique_direction(deg_x: float = 12.0, deg_z: float = 7.0) -> np.ndarray:
    """A proper rotation (LPS, columns = voxel axes) tilted about x then z."""
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def phantom(
    shape: tuple[int, int, int] = (20, 16, 8),
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.5),
    *,
    seed: int = 0,
    direction: np.ndarray | None = None,
) -> Volume:
    """A random integer HU volume on an oblique grid."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 2000, size=shape).astype(np.float32)
    geometry = Geometry.from_itk(
        shape=shape,
        spacing=spacing,
        origin=(-20.0, 15.0, 30.0),
        direction=oblique_direction() if direction is None else direction,
    )
    return Volume(array=hu[None], geometry=geometry)


def slice_dataset(
    pixels: np.ndarray,
    *,
    position: np.ndarray,
    orientation: np.ndarray,
    pixel_spacing: tuple[float, float],
    series_uid: str,
    study_uid: str,
    instance: int,
    **extra: Any,
) -> pydicom.Dataset:
    """One CT slice: ``pixels`` is ``(rows, cols)`` HU, stored as uint16 with intercept -1024."""
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "frame"])
    ds.PatientID = "FAKE"
    ds.Modality = "CT"
    ds.SeriesNumber = 3
    ds.SeriesDescription = "fake ct"
    ds.InstanceNumber = instance
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = [f"{pixel_spacing[0]:.6f}", f"{pixel_spacing[1]:.6f}"]
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = (pixels.astype(np.int32) + 1024).astype(np.uint16).tobytes()
    return ds


def write_series(
    volume: Volume,
    folder: Path,
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    prefix: str = "IM",
    shear_rows_per_slice: int = 0,
    **extra: Any,
) -> list[Path]:
    """Write ``volume`` as single-frame slices (file k = slice k); returns the files in slice order.

    ``shear_rows_per_slice`` simulates gantry tilt: slice k's content and origin move by k rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    g = volume.geometry
    direction = g.direction
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    sx, sy, sz = g.spacing
    origin = np.asarray(g.origin)
    hu = volume.array[0]
    paths = []
    n = hu.shape[2]
    for k in range(n):
        plane = hu[:, :, k].T  # (rows = Y, cols = X)
        position = origin + k * sz * normal
        if shear_rows_per_slice:
            shift = k * shear_rows_per_slice
            plane = np.roll(plane, shift, axis=0)
            plane[:shift] = -1000
            position = position - shift * sy * col_dir
        ds = slice_dataset(
            plane,
            position=position,
            orientation=np.concatenate([row_dir, col_dir]),
            pixel_spacing=(sy, sx),
            series_uid=series_uid,
            study_uid=study_uid,
            instance=n - k,
            **extra,
        )
        path = folder / f"{prefix}{k:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def edit(path: Path, target: Path | None = None, **changes: Any) -> Path:
    """Rewrite a file with changed attributes (``None`` deletes); returns where it was written."""
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = target or path
    ds.save_as(out, enforce_file_format=True)
    return out
