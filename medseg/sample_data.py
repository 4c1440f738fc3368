"""Deterministic CT- and MR-like abdominal phantoms in the MSD / nnU-Net layout.

Anatomy is defined in patient (LPS) millimetres and *sampled* on a scanner grid that
has anisotropic spacing, a tilted (non-identity) direction and a non-zero origin, so
every case exercises the geometry path.  Each phantom has a body outline with a
subcutaneous fat layer, a spine (unlabelled bone), bowel gas pockets, and the labelled
classes ``liver`` (1), ``kidney`` (2) and ``lesion`` (3, hypodense spheres inside the
liver); images get a point-spread blur, noise and a smooth shading / bias field.

Everything is a pure function of ``(seed, modality, case index)``; regenerating gives
identical voxels and geometry.  Run ``python -m medseg.sample_data OUT_DIR`` or see
:func:`generate_sample_data`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medseg.io.images import atomic_path, write_json_atomic, write_volume
from medseg.io.volume import Geometry, Volume
from medseg.types import PathLike

__all__ = [
    "DATASETS",
    "LABELS",
    "Phantom",
    "generate_dataset",
    "generate_sample_data",
    "make_phantom",
    "write_ct_dicom_series",
]

Modality = Literal["CT", "MR"]

LABELS: dict[str, int] = {"background": 0, "liver": 1, "kidney": 2, "lesion": 3}
DEFAULT_SEED = 20261121

#: name -> (modality, channel names, training cases, test cases)
DATASETS: dict[str, tuple[Modality, tuple[str, ...], int, int]] = {
    "Dataset001_CTPhantom": ("CT", ("CT",), 10, 4),
    "Dataset002_MRPhantom": ("MR", ("T1", "T2"), 4, 2),
}

# Tissue -> intensity per modality/channel. Tissues: 0 air, 1 fat, 2 soft tissue,
# 3 liver, 4 kidney, 5 lesion, 6 bone, 7 bowel gas.
_CT_HU = np.array([-1000.0, -95.0, 45.0, 62.0, 165.0, 18.0, 480.0, -850.0])
_MR_T1 = np.array([0.0, 900.0, 420.0, 560.0, 430.0, 280.0, 180.0, 0.0])
_MR_T2 = np.array([0.0, 700.0, 300.0, 330.0, 780.0, 1050.0, 150.0, 0.0])


@dataclass
class Phantom:
    """One generated case.

    Attributes:
        channels: One ``(1, X, Y, Z)`` image volume per modality channel.
        label: ``(1, X, Y, Z)`` uint8 label volume on the same grid.
    """

    channels: list[Volume]
    label: Volume


def _random_grid(rng: np.random.Generator, case: int) -> Geometry:
    shape = (80, 80, 36)
    in_plane = rng.uniform(1.9, 2.2)
    spacing = np.array([in_plane, in_plane, rng.uniform(3.0, 3.8)])
    # Half the cases are stored "radiological" (x index towards patient left, as DICOM),
    # half "neurological" (x and y flipped); both proper rotations, tilted up to 12 deg.
    base = np.eye(3) if case % 2 == 0 else np.diag([-1.0, -1.0, 1.0])
    tilt = Rotation.from_euler("xyz", rng.uniform(-12, 12, size=3), degrees=True).as_matrix()
    direction = tilt @ base
    centre = np.array([8.0, -25.0, -140.0]) + rng.uniform(-15, 15, size=3)
    origin = centre - direction @ (spacing * (np.array(shape) - 1) / 2)
    return Geometry.from_itk(shape=shape, spacing=tuple(spacing), origin=tuple(origin), direction=direction)


def _world_points(geometry: Geometry) -> np.ndarray:
    """``(X, Y, Z, 3)`` LPS coordinates of every voxel centre."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geometry.shape], indexing="ij"), axis=-1)
    matrix = np.asarray(geometry.direction) * np.asarray(geometry.spacing)
    return idx @ matrix.T + np.asarray(geometry.origin)


def _inside_ellipsoid(points: np.ndarray, centre: np.ndarray, axes: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    local = (points - centre) @ rotation  # coordinates in the ellipsoid's frame
    return np.sum((local / axes) ** 2, axis=-1) <= 1.0


def _tissues(rng: np.random.Generator, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tissue index map and label map for one random anatomy, in patient coordinates."""
    centre = np.array([8.0, -25.0, -140.0])
    rel = points - centre
    a, b = rng.uniform(62, 70), rng.uniform(46, 52)
    radial = (rel[..., 0] / a) ** 2 + (rel[..., 1] / b) ** 2
    tissue = np.zeros(points.shape[:3], dtype=np.uint8)
    label = np.zeros(points.shape[:3], dtype=np.uint8)
    tissue[radial <= 1.0] = 1  # fat
    tissue[radial <= 0.80] = 2  # soft tissue / muscle
    # Spine: posterior midline cylinder, vertebral bodies separated by discs.
    spine = (rel[..., 0] ** 2 + (rel[..., 1] - 0.62 * b) ** 2) <= 10.5**2
    discs = np.mod(rel[..., 2], 28.0) < 5.0
    tissue[spine & ~discs] = 6
    # Bowel gas pockets on the patient's left, anterior.
    for _ in range(rng.integers(2, 5)):
        c = centre + np.array([rng.uniform(10, 35), rng.uniform(-30, -10), rng.uniform(-40, 40)])
        r = rng.uniform(4, 8)
        tissue[np.sum((points - c) ** 2, axis=-1) <= r * r] = 7
    # Two kidneys, posterior, either side of the spine.
    kidneys = np.zeros(points.shape[:3], dtype=bool)
    for side in (-1.0, 1.0):
        kc = centre + np.array([side * 34.0, 24.0, -22.0]) + rng.uniform(-3, 3, size=3)
        kaxes = np.array([11.0, 14.0, 22.0]) * rng.uniform(0.9, 1.1, size=3)
        krot = Rotation.from_euler("zx", [side * rng.uniform(10, 25), rng.uniform(-10, 10)], degrees=True).as_matrix()
        kidneys |= _inside_ellipsoid(points, kc, kaxes, krot)
    # Liver on the patient's right (LPS -x), slightly anterior; the kidney wins where they touch.
    liver_c = centre + np.array([-24.0, -4.0, 12.0]) + rng.uniform(-4, 4, size=3)
    liver_axes = np.array([30.0, 26.0, 38.0]) * rng.uniform(0.9, 1.1, size=3)
    liver_rot = Rotation.from_euler("z", rng.uniform(-20, 20), degrees=True).as_matrix()
    liver = _inside_ellipsoid(points, liver_c, liver_axes, liver_rot) & ~kidneys
    # One to three hypodense lesions inside the liver.
    lesions = np.zeros(points.shape[:3], dtype=bool)
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(7.0, 11.0)
        shrink = 1.0 - (radius + 2.0) / liver_axes
        u = rng.uniform(-1, 1, size=3)
        u /= max(1.0, float(np.linalg.norm(u)))
        lc = liver_c + liver_rot @ (u * liver_axes * shrink)
        lesions |= np.sum((points - lc) ** 2, axis=-1) <= radius * radius
    lesions &= liver
    for mask, tissue_id, name in ((liver, 3, "liver"), (kidneys, 4, "kidney"), (lesions, 5, "lesion")):
        tissue[mask] = tissue_id
        label[mask] = LABELS[name]
    return tissue, label


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], *, amplitude: float) -> np.ndarray:
    """A smooth random field in ``[-amplitude, amplitude]`` (a low-order polynomial)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = np.zeros(shape)
    for _ in range(4):
        coeffs = rng.uniform(-1, 1, size=3)
        powers = rng.integers(0, 3, size=3)
        field += np.prod([c * g**p for c, g, p in zip(coeffs, grids, powers, strict=True)], axis=0)
    peak = np.max(np.abs(field)) or 1.0
    return amplitude * field / peak


def _render(rng: np.random.Generator, tissue: np.ndarray, table: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    values = table.copy()
    values[3:6] *= rng.uniform(0.95, 1.05, size=3)  # per-case contrast variation
    image = values[tissue]
    sigma = [0.8 / (s / min(spacing)) for s in spacing]  # ~point spread, finer in z in voxels
    return ndimage.gaussian_filter(image, sigma=sigma)


def make_phantom(case: int, *, modality: Modality = "CT", seed: int = DEFAULT_SEED) -> Phantom:
    """Generate one phantom.

    Args:
        case: Case index; different cases have different anatomy and grids.
        modality: ``"CT"`` (one channel, HU, int16) or ``"MR"`` (T1- and T2-like channels).
        seed: Base seed; the case is a pure function of ``(seed, modality, case)``.

    Returns:
        A :class:`Phantom` whose volumes share one grid of shape ``(80, 80, 36)``.
    """
    rng = np.random.default_rng([seed, 0 if modality == "CT" else 1, case])
    geometry = _random_grid(rng, case)
    tissue, label = _tissues(rng, _world_points(geometry))
    shape = geometry.shape
    channels: list[Volume] = []
    if modality == "CT":
        image = _render(rng, tissue, _CT_HU, geometry.spacing)
        image += _smooth_field(rng, shape, amplitude=12.0)  # beam-hardening-like shading
        image += rng.normal(0.0, 12.0, size=shape)
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
        channels.append(Volume(image[None], geometry, kind="image"))
    else:
        bias = 1.0 + _smooth_field(rng, shape, amplitude=0.25)  # coil sensitivity, shared
        for table in (_MR_T1, _MR_T2):
            clean = _render(rng, tissue, table, geometry.spacing) * bias
            noisy = np.hypot(clean + rng.normal(0, 18.0, shape), rng.normal(0, 18.0, shape))  # Rician
            channels.append(Volume(np.rint(noisy).astype(np.int16)[None], geometry, kind="image"))
    return Phantom(channels=channels, label=Volume(label[None], geometry, kind="label"))


def generate_dataset(
    root: PathLike,
    name: str = "Dataset001_CTPhantom",
    *,
    seed: int = DEFAULT_SEED,
    num_train: int | None = None,
    num_test: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one phantom dataset in the nnU-Net v2 / MSD layout.

    Layout: ``dataset.json``, ``imagesTr/<case>_<channel:04d>.nii.gz``,
    ``labelsTr/<case>.nii.gz`` and the held-out ``imagesTs/`` + ``labelsTs/``.

    Args:
        root: Parent folder; the dataset goes to ``root/name``.
        name: One of :data:`DATASETS`.
        seed: Base seed.
        num_train: Override the number of training cases.
        num_test: Override the number of held-out cases.
        overwrite: Replace existing files.

    Returns:
        The dataset folder.
    """
    modality, channel_names, n_train, n_test = DATASETS[name]
    n_train = n_train if num_train is None else num_train
    n_test = n_test if num_test is None else num_test
    folder = Path(root) / name
    prefix = modality.lower()
    label_names = {v: k for k, v in LABELS.items()}
    for index in range(n_train + n_test):
        split = "Tr" if index < n_train else "Ts"
        case_id = f"{prefix}_{index:03d}"
        phantom = make_phantom(index, modality=modality, seed=seed)
        for channel, volume in enumerate(phantom.channels):
            write_volume(volume, folder / f"images{split}" / f"{case_id}_{channel:04d}.nii.gz", overwrite=overwrite)
        write_volume(phantom.label, folder / f"labels{split}" / f"{case_id}.nii.gz", overwrite=overwrite)
    description = {
        "name": name.split("_", 1)[1],
        "description": f"Synthetic {modality} abdominal phantoms generated by medseg.sample_data",
        "reference": f"medseg (deterministic generator, seed {seed})",
        "licence": "CC0-1.0",
        "channel_names": {str(i): c for i, c in enumerate(channel_names)},
        "labels": dict(LABELS),
        "numTraining": n_train,
        "numTest": n_test,
        "file_ending": ".nii.gz",
        "medseg_generator": {"seed": seed, "modality": modality, "label_names": label_names},
    }
    write_json_atomic(folder / "dataset.json", description, overwrite=True)
    return folder


def write_ct_dicom_series(volume: Volume, folder: PathLike, *, case_id: str, seed: int = DEFAULT_SEED) -> Path:
    """Write a CT volume as a single-frame CT Image Storage series (one file per slice).

    Slices are stored as unsigned 16-bit values with ``RescaleIntercept = -1024`` so
    readers must apply the rescale to get HU back.  UIDs are derived deterministically
    from ``(seed, case_id)``.  The grid must be a proper rotation (det = +1) so that the
    slice normal points along increasing slice index.

    Returns:
        The series folder.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    geometry = volume.geometry
    direction = geometry.direction
    if np.linalg.det(direction) < 0:
        raise ValueError("write_ct_dicom_series needs a right-handed grid (det(direction) > 0)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = volume.array[0]
    entropy = [str(seed), case_id]
    study_uid = generate_uid(entropy_srcs=[*entropy, "study"])
    series_uid = generate_uid(entropy_srcs=[*entropy, "series"])
    frame_uid = generate_uid(entropy_srcs=[*entropy, "frame"])
    sx, sy, sz = geometry.spacing
    row_dir, col_dir, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    origin = np.asarray(geometry.origin)
    date = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    for k in range(hu.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[*entropy, "slice", str(k)])
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
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = f"Phantom^{case_id}"
        ds.PatientID = f"MEDSEG-{case_id}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "medseg phantom"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = hu.shape[2] - k  # deliberately not the spatial order
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = f"Phantom CT {case_id}"
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + k * sz * normal]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in np.concatenate([row_dir, col_dir])]
        ds.PixelSpacing = [f"{sy:.8f}", f"{sx:.8f}"]
        ds.SliceThickness = f"{sz:.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.KVP = "120"
        stored = (hu[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16)  # (rows=Y, cols=X)
        ds.PixelData = stored.tobytes()
        # No file suffix: real archives often have none.
        with atomic_path(folder / f"IM{k:04d}", overwrite=True) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return folder


def generate_sample_data(
    root: PathLike,
    *,
    datasets: Sequence[str] = ("Dataset001_CTPhantom",),
    seed: int = DEFAULT_SEED,
    overwrite: bool = False,
) -> list[Path]:
    """Write phantom datasets plus the first held-out CT case as a DICOM series.

    The repository's ``sample_data/`` is exactly ``generate_sample_data("sample_data")``
    (the CT dataset and the DICOM series); the MR dataset is generated on demand.

    Returns:
        The dataset folders and the DICOM series folder.
    """
    root = Path(root)
    out = [generate_dataset(root, name, seed=seed, overwrite=overwrite) for name in datasets]
    n_train = DATASETS["Dataset001_CTPhantom"][2]
    phantom = make_phantom(n_train, modality="CT", seed=seed)
    case_id = f"ct_{n_train:03d}"
    out.append(write_ct_dicom_series(phantom.channels[0], root / "dicom" / case_id, case_id=case_id, seed=seed))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m medseg.sample_data OUT_DIR``: (re)generate the embedded sample data."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--all", action="store_true", help="also the two-channel MR dataset")
    args = parser.parse_args(argv)
    names = tuple(DATASETS) if args.all else ("Dataset001_CTPhantom",)
    for path in generate_sample_data(args.out, datasets=names, seed=args.seed, overwrite=args.overwrite):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
