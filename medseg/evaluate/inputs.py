"""Evaluation inputs: case matching, reading label volumes, label names, regions, resampling.

* A prediction or reference argument is a folder of label volumes or a single file.  Label
  volumes are NIfTI (``.nii.gz``, ``.nii``), NRRD, MHA/MHD, or DICOM SEG (``.dcm``, read with
  :func:`medseg.io.dicom_seg.read_dicom_seg`); the case id is the file name without its suffix.
* Label names come from a model directory (``plan.yaml``), a dataset folder or ``dataset.json``
  (nnU-Net v1/v2 or MSD; v2 region entries ``"name": [values]`` become regions), or a plan file.
* Regions come from a YAML/JSON file or an inline JSON/YAML mapping ``{name: [values or class names]}``.
* :func:`resample_to_reference` puts a prediction on the reference grid (nearest neighbour,
  SimpleITK); it is only used when asked (``--resample-to-ref``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import yaml

from medseg.errors import ConfigError, InputError, MedsegError
from medseg.io import VOLUME_SUFFIXES, Geometry, Volume, is_dicom_file, load_volume, split_suffix
from medseg.io.volume import label_dtype
from medseg.types import PathLike

__all__ = [
    "DICOM_SEG_SUFFIXES",
    "CaseFiles",
    "find_case_files",
    "load_label_names",
    "load_regions",
    "read_label_volume",
    "resample_to_reference",
]

#: Suffixes of DICOM SEG files recognised in folders (single files are sniffed instead).
DICOM_SEG_SUFFIXES = (".dcm",)


@dataclass
class CaseFiles:
    """Files of one side (predictions or references), keyed by case id.

    Attributes:
        files: ``{case id: file}``.
        duplicates: ``{case id: [files]}`` for ids that several files share (not in ``files``).
    """

    files: dict[str, Path] = field(default_factory=dict)
    duplicates: dict[str, list[Path]] = field(default_factory=dict)


def find_case_files(path: PathLike, *, what: str) -> CaseFiles:
    """Label files of a folder (or a single file) keyed by case id.

    Hidden files and files that are neither volumes nor ``.dcm`` are skipped; ids shared by several
    files (``a.nii`` and ``a.nii.gz``) are reported in ``duplicates`` and left out.

    Raises:
        InputError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"no such {what} file or folder")
    if path.is_file():
        return CaseFiles(files={case_id(path): path})
    found: dict[str, list[Path]] = {}
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        stem, suffix = split_suffix(file)
        if suffix in VOLUME_SUFFIXES or suffix in DICOM_SEG_SUFFIXES:
            found.setdefault(stem, []).append(file)
    out = CaseFiles()
    for key, files in found.items():
        if len(files) == 1:
            out.files[key] = files[0]
        else:
            out.duplicates[key] = files
    return out


def case_id(path: Path) -> str:
    """Case id of a label file: its name without the volume / ``.dcm`` suffix."""
    return split_suffix(path)[0]


def read_label_volume(path: PathLike) -> Volume:
    """Read a label volume (NIfTI/NRRD/MHA, or a DICOM SEG combined into one label map).

    Returns:
        A ``kind="label"`` :class:`Volume` with array ``(1, X, Y, Z)``; a DICOM SEG's segment
        names are in ``meta["label_names"]``.

    Raises:
        InputError: Unreadable, not a label volume, or a DICOM file that is not a readable SEG.
    """
    path = Path(path)
    _, suffix = split_suffix(path)
    if suffix in VOLUME_SUFFIXES:
        volume = load_volume(path, kind="label")
    elif path.is_file() and is_dicom_file(path):
        try:
            from medseg.io.dicom_seg import read_dicom_seg
        except ImportError as exc:  # pragma: no cover - depends on the installed medseg
            raise InputError(path, f"DICOM SEG reading is not available ({exc})") from exc
        volume = read_dicom_seg(path, combine=True)
    else:
        raise InputError(path, f"not a label volume ({', '.join(VOLUME_SUFFIXES)}) or a DICOM SEG")
    if volume.channels != 1:
        raise InputError(path, f"a label volume must have one channel, got {volume.channels}")
    return volume


def names_from_meta(volume: Volume) -> dict[int, str]:
    """Label names a volume carries (DICOM SEG segments, or a medseg ``<stem>.json`` sidecar)."""
    raw = volume.meta.get("label_names")
    if raw is None:
        sidecar = volume.meta.get("sidecar")
        raw = sidecar.get("labels") if isinstance(sidecar, dict) else None
    if not isinstance(raw, Mapping):
        return {}
    out: dict[int, str] = {}
    for key, value in raw.items():
        if str(key).strip().isdigit() and int(key) != 0:
            out[int(key)] = str(value)
    return out


# ------------------------------------------------------------------ label names and regions
def load_label_names(path: PathLike) -> tuple[dict[int, str], dict[str, list[int]]]:
    """Class names (and any region definitions) from a model, dataset or file.

    Args:
        path: A model (medseg model directory, nnU-Net results folder: see
            :func:`medseg.models.adapters.open_model`), a ``plan.yaml``, a dataset folder containing
            ``dataset.json``, or a ``dataset.json``.

    Returns:
        ``({label value: name}, {region name: [values]})``, background 0 left out.

    Raises:
        ConfigError: Missing or unreadable file, or labels that cannot be interpreted.
    """
    p = Path(path)
    if p.is_dir():
        from medseg.models.adapters import ADAPTERS, open_model

        if any(adapter.recognises(p) for adapter in ADAPTERS):  # a model: its label names, via the model seam
            try:
                names = open_model(p).label_names
            except MedsegError as exc:
                raise ConfigError(f"cannot read label names: {exc}") from exc
            return {int(k): str(v) for k, v in names.items() if int(k) != 0}, {}
        if (p / "dataset.json").is_file():
            p = p / "dataset.json"
        else:
            raise ConfigError(f"{p}: neither a model directory (plan.yaml) nor a dataset folder (dataset.json)")
    if not p.is_file():
        raise ConfigError(f"{p}: no such label-name file")
    if p.suffix in (".yaml", ".yml"):
        from medseg.data.plan import load_plan

        return {int(k): str(v) for k, v in load_plan(p).labels.items() if int(k) != 0}, {}
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read label names ({exc})") from exc
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(f"{p}: no 'labels' mapping")
    return _parse_dataset_labels(p, labels)


def _parse_dataset_labels(path: Path, labels: dict[str, Any]) -> tuple[dict[int, str], dict[str, list[int]]]:
    """nnU-Net v2 ``{name: value | [values]}`` or v1/MSD ``{"value": name}``."""
    names: dict[int, str] = {}
    regions: dict[str, list[int]] = {}
    for key, value in labels.items():
        if str(key).strip().isdigit() and isinstance(value, str):
            names[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            if len(value) == 1:
                names[int(value[0])] = str(key)
            else:
                regions[str(key)] = sorted(int(v) for v in value)
        else:
            raise ConfigError(f"{path}: cannot interpret label entry {key!r}: {value!r}")
    names.pop(0, None)
    for values in regions.values():
        for v in values:
            if v != 0:
                names.setdefault(v, f"label_{v}")
    return dict(sorted(names.items())), regions


def load_regions(spec: PathLike | Mapping[str, Any]) -> dict[str, list[int | str]]:
    """Region definitions ``{name: [label values or class names]}``.

    Args:
        spec: A mapping, a YAML/JSON file, or inline YAML/JSON text such as
            ``'{"whole_tumour": [1, 2, 3, 4]}'``.

    Raises:
        ConfigError: Unreadable file or text, or not a mapping of names to non-empty lists.
    """
    source = "regions"
    if isinstance(spec, Mapping):
        raw: Any = dict(spec)
    else:
        text = str(spec)
        p = Path(text)
        if p.is_file():
            source = str(p)
            try:
                text = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{p}: cannot read regions ({exc})") from exc
        elif not text.lstrip().startswith("{"):
            raise ConfigError(f"{text}: no such regions file (or give inline JSON like '{{\"wt\": [1, 2, 4]}}')")
        try:
            raw = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML/JSON ({exc})") from exc
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{source}: regions must be a non-empty mapping of name -> list of labels")
    out: dict[str, list[int | str]] = {}
    for name, members in raw.items():
        if isinstance(members, (int, str)):
            members = [members]
        if not isinstance(members, list) or not members:
            raise ConfigError(f"{source}: region {name!r} must list label values or class names, got {members!r}")
        parsed: list[int | str] = []
        for m in members:
            if isinstance(m, bool) or not isinstance(m, (int, str)):
                raise ConfigError(f"{source}: region {name!r}: {m!r} is not a label value or class name")
            parsed.append(int(m) if isinstance(m, int) or m.strip().isdigit() else m)
        out[str(name)] = parsed
    return out


# ------------------------------------------------------------------ grids
def resample_to_reference(volume: Volume, reference: Geometry) -> Volume:
    """Nearest-neighbour resampling of a label volume onto ``reference`` (outside -> 0).

    Uses SimpleITK (``sitk.Resample`` with an identity transform) on the ITK (LPS) description of
    both grids, so any difference of origin, spacing, direction or extent is handled.

    Args:
        volume: Label volume ``(1, X, Y, Z)``.
        reference: Target grid.

    Returns:
        A label volume on ``reference`` (same dtype family, ``meta["resampled_from"]`` set).
    """
    source = _to_itk(volume.array[0], volume.geometry)
    target = _to_itk(np.zeros((1, 1, 1), dtype=np.uint8), reference, size=reference.shape)
    out = sitk.Resample(source, target, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, source.GetPixelID())
    array = sitk.GetArrayFromImage(out).transpose(2, 1, 0)
    max_label = int(array.max()) if array.size else 0
    array = np.ascontiguousarray(array.astype(label_dtype(max_label), copy=False))
    meta = dict(volume.meta, resampled_from=volume.geometry.to_dict())
    return Volume(array[None], reference, kind="label", source=volume.source, meta=meta)


def _to_itk(array: np.ndarray, geometry: Geometry, *, size: tuple[int, ...] | None = None) -> sitk.Image:
    if size is None:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    else:
        image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    itk = geometry.to_itk()
    image.SetSpacing(itk["spacing"])
    image.SetOrigin(itk["origin"])
    image.SetDirection(itk["direction"])
    return image
