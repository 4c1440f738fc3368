"""Evaluation inputs: case matching, reading label volumes, label names, regions, resampling.

* A prediction or reference argument is one of:

  - a single file: a label volume (NIfTI ``.nii.gz``/``.nii``, NRRD, MHA/MHD) or a DICOM SEG;
  - a folder of such files (case id = file name without suffix; DICOM SEG as ``.dcm``);
  - a ``medseg batch`` output folder (``OUT/<study>/<series>/segmentation.nii.gz``, else ``seg.dcm``,
    recognised by the ``.medseg-series.json`` markers; case id = ``<study>/<series>``);
  - a folder of DICOM series (mask series such as TCIA's ``MaskTumor``, and DICOM SEGs, in any
    sub-folders; case id = the series' folder relative to the argument).

  Every case also carries the image series and study it belongs to (a SEG's referenced series, a
  batch output's source series, a converted NIfTI's sidecar ``series_uid``, a DICOM series' own
  UIDs), which :func:`medseg.evaluate.api.evaluate_folders` uses to pair cases whose names differ.
* Label names come from a model directory (``plan.yaml``), a dataset folder or ``dataset.json``
  (nnU-Net v1/v2 or MSD; v2 region entries ``"name": [values]`` become regions), a plan file, or
  ``--label-names 1=tumour,2=edema`` (:func:`parse_label_names`).
* Regions come from a YAML/JSON file or an inline JSON/YAML mapping ``{name: [values or class names]}``.
* :func:`resample_to_reference` puts a prediction on the reference grid (nearest neighbour,
  SimpleITK); it is only used when asked (``--resample-to-ref``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from medseg.errors import ConfigError, InputError, MedsegError
from medseg.io import VOLUME_SUFFIXES, Geometry, Volume, is_dicom_file, load_volume, split_suffix
from medseg.io.safe_yaml import load_json_file, load_yaml_file, load_yaml_text
from medseg.io.volume import label_dtype
from medseg.types import PathLike

if TYPE_CHECKING:
    from medseg.io.dicom import DicomSeries

__all__ = [
    "DICOM_SEG_SUFFIXES",
    "CaseFiles",
    "LabelInput",
    "find_case_files",
    "load_label_names",
    "load_regions",
    "parse_label_names",
    "read_label_volume",
    "resample_to_reference",
]

#: Suffixes of DICOM SEG files recognised in folders (single files are sniffed instead).
DICOM_SEG_SUFFIXES = (".dcm",)
#: Completion marker of a ``medseg batch`` series output folder (see :mod:`medseg.batch.runner`).
BATCH_MARKER = ".medseg-series.json"
BATCH_LABEL_FILES = ("segmentation.nii.gz", "seg.dcm")


@dataclass(frozen=True)
class LabelInput:
    """Where one case's label volume comes from.

    Attributes:
        path: The label file, or the folder of a DICOM mask series.
        series: The DICOM mask series (``None`` for files).
        series_uid: SeriesInstanceUID of the image series the labels belong to, if known.
        study_uid: StudyInstanceUID, if known.
    """

    path: Path
    series: DicomSeries | None = field(default=None, compare=False)
    series_uid: str = ""
    study_uid: str = ""

    @property
    def name(self) -> str:
        """File (or folder) name, for messages."""
        return self.path.name

    def __str__(self) -> str:
        if self.series is None:
            return str(self.path)
        return f"{self.path} (DICOM series {self.series.series_number} '{self.series.description}')"

    def read(self) -> Volume:
        """The ``(1, X, Y, Z)`` label volume (see :func:`read_label_volume`)."""
        if self.series is None:
            return read_label_volume(self.path)
        from medseg.io.dicom import load_series
        from medseg.io.images import _as_labels

        volume = load_series(self.series, source=self.path)
        if volume.channels != 1:
            raise InputError(
                self.path, f"a multi-volume DICOM series ({volume.channels} volumes) is not a label volume"
            )
        labels = _as_labels(self.path, volume.array)
        return Volume(labels, volume.geometry, kind="label", source=str(self.path), meta=volume.meta)


@dataclass
class CaseFiles:
    """Label inputs of one side (predictions or references), keyed by case id.

    Attributes:
        files: ``{case id: input}``.
        duplicates: ``{case id: [inputs]}`` for ids that several inputs share (not in ``files``).
    """

    files: dict[str, LabelInput] = field(default_factory=dict)
    duplicates: dict[str, list[LabelInput]] = field(default_factory=dict)

    def add(self, case: str, item: LabelInput) -> None:
        """Add an input; a second input with the same id moves the id to ``duplicates``."""
        if case in self.duplicates:
            self.duplicates[case].append(item)
        elif case in self.files:
            self.duplicates[case] = [self.files.pop(case), item]
        else:
            self.files[case] = item


def find_case_files(path: PathLike, *, what: str) -> CaseFiles:
    """Label inputs of a file or folder keyed by case id (layouts: see the module docstring).

    Hidden files and files that are neither volumes nor ``.dcm`` are skipped; ids shared by several
    inputs (``a.nii`` and ``a.nii.gz``) are reported in ``duplicates`` and left out.

    Raises:
        InputError: ``path`` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, f"no such {what} file or folder")
    out = CaseFiles()
    if path.is_file():
        out.add(case_id(path), _file_input(path))
        return out
    markers = sorted(path.glob(f"*/*/{BATCH_MARKER}"))
    if markers:
        for marker in markers:
            _add_batch_case(out, path, marker)
        return out
    dicom_images = False
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    volume_stems = {split_suffix(f)[0] for f in files if split_suffix(f)[1] in VOLUME_SUFFIXES}
    for file in files:
        stem, suffix = split_suffix(file)
        if _predict_sibling(stem, volume_stems):
            continue  # `medseg predict --outputs nifti,seg,rtstruct`: the same prediction as <case>.nii.gz
        if suffix in VOLUME_SUFFIXES:
            out.add(stem, _file_input(file))
        elif suffix in DICOM_SEG_SUFFIXES or is_dicom_file(file):
            if _is_seg(file):
                out.add(stem, _file_input(file))
            else:
                dicom_images = True
    if dicom_images or (not out.files and not out.duplicates and any(p.is_dir() for p in path.iterdir())):
        _add_dicom_cases(out, path)
    return out


def _predict_sibling(stem: str, volume_stems: set[str]) -> bool:
    """``<case>_seg`` / ``<case>_rtstruct`` beside ``<case>.nii.gz`` (other outputs of one prediction)."""
    return any(stem.endswith(tail) and stem[: -len(tail)] in volume_stems for tail in ("_seg", "_rtstruct"))


def _is_seg(path: Path) -> bool:
    from medseg.io.dicom_seg import is_dicom_seg

    return is_dicom_seg(path)


def _file_input(path: Path) -> LabelInput:
    """A label file with the series/study it belongs to (SEG header, or a medseg JSON sidecar)."""
    series_uid = study_uid = ""
    if split_suffix(path)[1] not in VOLUME_SUFFIXES:
        from medseg.io.dicom import read_dataset

        try:
            ds = read_dataset(path, stop_before_pixels=True, force=True)
            refs = ds.get("ReferencedSeriesSequence") or []
            series_uid = str(refs[0].get("SeriesInstanceUID", "")) if len(refs) else ""
            study_uid = str(ds.get("StudyInstanceUID", "") or "")
        except Exception:
            pass
    else:
        sidecar = path.with_name(split_suffix(path)[0] + ".json")
        try:
            data = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict):
            series_uid = str(data.get("series_uid") or data.get("SeriesInstanceUID") or "")
            study_uid = str(data.get("study_uid") or data.get("StudyInstanceUID") or "")
    return LabelInput(path, series_uid=series_uid, study_uid=study_uid)


def _add_batch_case(out: CaseFiles, root: Path, marker: Path) -> None:
    folder = marker.parent
    label = next((folder / n for n in BATCH_LABEL_FILES if (folder / n).is_file()), None)
    if label is None:
        return
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        data = {}
    out.add(
        folder.relative_to(root).as_posix(),
        LabelInput(label, series_uid=str(data.get("series_uid") or ""), study_uid=str(data.get("study_uid") or "")),
    )


def _add_dicom_cases(out: CaseFiles, root: Path) -> None:
    """Every DICOM image series (a mask series) and DICOM SEG under ``root`` becomes a case."""
    from medseg.io.dicom import scan_dicom

    scan = scan_dicom(root)
    folders: dict[Path, list[DicomSeries]] = {}
    for series in scan.series:
        folders.setdefault(_common_parent(series.files), []).append(series)
    for folder, members in folders.items():
        base = folder.relative_to(root).as_posix() if folder != root else ""
        for series in members:
            name = base
            if len(members) > 1 or not base:
                own = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{series.series_number or ''}_{series.description}").strip("_")
                name = f"{base}/{own or series.key}" if base else (own or series.key)
            out.add(name, LabelInput(folder, series=series, series_uid=series.uid, study_uid=series.study_uid))
    for file, reason in scan.skipped:
        if reason.startswith("segmentation (DICOM SEG)"):
            out.add(split_suffix(file.relative_to(root))[0] if file != root else case_id(file), _file_input(file))


def _common_parent(files: list[Path]) -> Path:
    import os

    return Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path(".")


def case_id(path: Path) -> str:
    """Case id of a label file: its name without the volume / ``.dcm`` suffix."""
    return split_suffix(path)[0]


def read_label_volume(path: PathLike) -> Volume:
    """Read a label volume (NIfTI/NRRD/MHA, a DICOM SEG combined into one label map, or a DICOM mask series folder).

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
    elif path.is_dir():
        volume = load_volume(path, kind="label", allow_4d=False)
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


def parse_label_names(text: str) -> dict[int, str]:
    """``"1=tumour,2=edema"`` -> ``{1: "tumour", 2: "edema"}`` (``--label-names``).

    Raises:
        ConfigError: An entry is not ``<positive integer>=<name>``, or a value repeats.
    """
    out: dict[int, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        value, sep, name = entry.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip() or int(value) == 0:
            raise ConfigError(f"--label-names: {entry!r} is not <label value>=<name> with a value >= 1 (e.g. 1=tumour)")
        if int(value) in out:
            raise ConfigError(f"--label-names: label {int(value)} is named twice")
        out[int(value)] = name.strip()
    if not out:
        raise ConfigError("--label-names: no names given (e.g. 1=tumour,2=edema)")
    return out


# ------------------------------------------------------------------ label names and regions
def load_label_names(path: PathLike) -> tuple[dict[int, str], dict[str, list[int]]]:
    """Class names (and any region definitions) from a model, dataset or file.

    Args:
        path: A model (medseg model directory, nnU-Net results folder, exported ONNX/TorchScript file: see
            :func:`medseg.models.adapters.open_model`), a ``plan.yaml``, a dataset folder containing
            ``dataset.json``, or a ``dataset.json``.

    Returns:
        ``({label value: name}, {region name: [values]})``, background 0 left out.

    Raises:
        ConfigError: Missing or unreadable file, or labels that cannot be interpreted.
    """
    p = Path(path)
    from medseg.models.adapters import ADAPTERS, open_model

    if any(adapter.recognises(p) for adapter in ADAPTERS):  # a model (folder or exported file), via the model seam
        try:
            names = open_model(p).label_names
        except MedsegError as exc:
            raise ConfigError(f"cannot read label names: {exc}") from exc
        return {int(k): str(v) for k, v in names.items() if int(k) != 0}, {}
    if p.is_dir():
        if (p / "dataset.json").is_file():
            p = p / "dataset.json"
        else:
            raise ConfigError(f"{p}: neither a model (plan.yaml, plans.json) nor a dataset folder (dataset.json)")
    if not p.is_file():
        raise ConfigError(f"{p}: no such label-name file")
    if p.suffix in (".yaml", ".yml"):
        from medseg.data.plan import load_plan

        return {int(k): str(v) for k, v in load_plan(p).labels.items() if int(k) != 0}, {}
    raw = load_json_file(p, what="label-name file")
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
        if p.exists():
            source = str(p)
            raw = load_yaml_file(p, what="regions file")  # YAML is a superset of JSON
        elif not text.lstrip().startswith("{"):
            raise ConfigError(f"{text}: no such regions file (or give inline JSON like '{{\"wt\": [1, 2, 4]}}')")
        else:
            raw = load_yaml_text(text, source=source)
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
