r"""Training datasets: where the cases are, and whether they are fit to train on.

Three ways to describe a dataset (:func:`load_dataset` picks by the path):

* **MSD / nnU-Net folder** -- ``dataset.json`` (nnU-Net v2 ``channel_names`` and ``labels`` as
  ``name -> value``, or MSD / v1 ``modality`` and ``"value" -> name``) with
  ``imagesTr/<case>_<cccc><ending>`` (one file per channel: ``_0000``, ``_0001``, ...),
  ``labelsTr/<case><ending>`` and optional ``imagesTs``/``labelsTs``.
* **YAML file** -- channels, labels and case lists; each list is explicit (``image`` /
  ``label`` paths: files or DICOM series folders), discovered with glob patterns, or a CSV
  file::

      name: PGBM
      channels: [T1post, FLAIRreg]
      labels: {0: background, 1: tumour}
      root: /data/pgbm                  # relative paths start here (default: the YAML's folder)
      group_pattern: '^(PGBM-\\d+)'     # patient key from the case id (k-fold keeps it together)
      training:
        discover: 'PGBM-*/*'            # one case per matching folder
        image: ['*T1post*', '*FLAIRreg*']   # inside the case folder, exactly one match each
        label: '*MaskTumor*'
      validation:                       # optional fixed validation cases (explicit list)
        - {id: c1, image: [a/t1, a/flair], label: a/mask}

* **CSV file** -- columns ``case_id`` (or ``id``), ``image`` or ``image_<channel name>``
  (one column per channel, in order), ``label``, optional ``group`` and ``split``
  (``train``/``val``/``test``).  A bare CSV declares no label names: the classes are the
  values found in the label files (``0..max``).

:func:`validate_dataset` reads every training case once and reports *every* problem
(missing or unreadable files, channel count, channel and label grids, label values
outside the declared classes); :func:`scan_dataset` returns the same pass's statistics
for planning.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from medseg.errors import DatasetError, MedsegError
from medseg.io import Volume, load_volume
from medseg.io.images import split_suffix
from medseg.types import PathLike

__all__ = [
    "GRID_ATOL",
    "Case",
    "CaseScan",
    "DatasetInfo",
    "ValidationReport",
    "case_group",
    "dataset_inputs",
    "find_cases",
    "load_dataset",
    "read_dataset",
    "read_label",
    "scan_dataset",
    "validate_dataset",
]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: Grids of channels and labels may differ by this much (affine entries, mm) and still count as equal.
GRID_ATOL = 1e-3


@dataclass
class Case:
    """One case: its channel images (in channel order) and optional label.

    Attributes:
        case_id: Unique name.
        images: One path per channel (files or DICOM series folders).
        label: Label volume path (file or DICOM series folder), if any.
        group: Patient key: cases with the same group stay in the same fold.
        problems: Problems found while listing the case (missing channel, ambiguous pattern).
    """

    case_id: str
    images: list[Path]
    label: Path | None = None
    group: str | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The MONAI data-dictionary form (``{"image": [...], "label": ...}``)."""
        item: dict[str, Any] = {"case_id": self.case_id, "image": [str(p) for p in self.images]}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass
class DatasetInfo:
    """A dataset's description and cases.

    Attributes:
        root: The dataset folder (or the folder of its YAML/CSV file).
        name: Dataset name.
        channel_names: Channel names in order (``["CT"]``, ``["FLAIR", "T1c"]``).
        label_names: ``{value: name}`` including background 0.
        training: Labelled training cases.
        test: Held-out cases (labels when present).
        validation: Fixed validation cases (used when no k-fold split is asked for).
        group_pattern: Regex giving the patient key from a case id (first group, else the match).
        source: The file or folder the description came from.
        labels_declared: False when label names were inferred from the label values (bare CSV).
    """

    root: Path
    name: str
    channel_names: list[str]
    label_names: dict[int, str]
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)
    validation: list[Case] = field(default_factory=list)
    group_pattern: str | None = None
    source: Path | None = None
    labels_declared: bool = True

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return max(self.label_names) + 1


def dataset_inputs(info: DatasetInfo) -> list[Path]:
    """Every path a dataset reads: its description file, its folder (nnU-Net/MSD layout) and each case's files.

    Outputs (model folders, plans) must not be, contain or lie inside any of them
    (:func:`medseg.io.paths.refuse_input_overlap`).
    """
    paths: list[Path] = [info.source] if info.source is not None else []
    if info.source is None or info.source.name == "dataset.json":
        paths.append(info.root)
    for case in (*info.training, *info.validation, *info.test):
        paths.extend(case.images)
        if case.label is not None:
            paths.append(case.label)
    return paths


# ----------------------------------------------------------------- nnU-Net / MSD folders
def _parse_labels(path: Path, raw: Any) -> dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty mapping")
    out: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, int) and not str(key).isdigit():  # v2: name -> value
            out[value] = str(key)
        elif str(key).isdigit():  # v1 / MSD: "value" -> name
            out[int(key)] = str(value)
        else:
            raise DatasetError(f"{path}: cannot interpret label entry {key!r}: {value!r} (region labels unsupported)")
    if 0 not in out:
        raise DatasetError(f"{path}: labels must include background 0")
    missing = sorted(set(range(max(out) + 1)) - set(out))
    if missing:
        raise DatasetError(f"{path}: label values must be consecutive; missing {missing}")
    return out


def find_cases(
    images_dir: Path, labels_dir: Path | None, *, num_channels: int, file_ending: str, strict: bool = True
) -> list[Case]:
    """Match ``<case>_<cccc><ending>`` images with ``<case><ending>`` labels.

    Args:
        images_dir: ``imagesTr`` / ``imagesTs``.
        labels_dir: ``labelsTr`` / ``labelsTs`` (None: no labels expected).
        num_channels: Channels every case must have.
        file_ending: ``.nii.gz`` etc.
        strict: Raise on missing channels or labels; otherwise record them in ``Case.problems``
            (and leave ``label`` None) for :func:`validate_dataset` to report.

    Raises:
        DatasetError: Listing every case with missing channels or a missing label (``strict``),
            or an image name without the ``_0000`` channel suffix.
    """
    if not images_dir.is_dir():
        return []
    channels: dict[str, dict[int, Path]] = {}
    for path in sorted(images_dir.iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
            continue
        stem, _ = split_suffix(path)
        match = _CHANNEL_RE.match(stem)
        if match is None:
            raise DatasetError(f"{path}: image names must end in _0000, _0001, ... (nnU-Net convention)")
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    problems: list[str] = []
    cases: list[Case] = []
    for case_id, found in sorted(channels.items()):
        case_problems = []
        if sorted(found) != list(range(num_channels)):
            case_problems.append(f"channels {sorted(found)} found, expected 0..{num_channels - 1}")
        label = None
        if labels_dir is not None:
            candidate = labels_dir / f"{case_id}{file_ending}"
            if candidate.is_file():
                label = candidate
            else:
                case_problems.append(f"no label {candidate}")
        problems += [f"{case_id}: {p}" for p in case_problems]
        if strict and case_problems:
            continue
        cases.append(Case(case_id, [found[c] for c in sorted(found)], label, problems=case_problems))
    if problems and strict:
        raise DatasetError(f"{images_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return cases


def read_dataset(root: PathLike, *, strict: bool = True) -> DatasetInfo:
    """Read an MSD / nnU-Net dataset folder (``dataset.json`` + ``imagesTr``/``labelsTr`` [+ ``*Ts``]).

    Args:
        root: The folder.
        strict: Raise on missing channels/labels (else leave them to :func:`validate_dataset`).

    Raises:
        DatasetError: Missing ``dataset.json``, unknown layout or inconsistent cases.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: not a dataset folder (no dataset.json)")
    from medseg.io.safe_yaml import load_json_file

    try:
        meta = load_json_file(meta_path, what="dataset.json")
    except MedsegError as exc:
        raise DatasetError(str(exc)) from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: must hold a JSON object, got {type(meta).__name__}")
    raw_channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw_channels, dict) or not raw_channels:
        raise DatasetError(f"{meta_path}: needs 'channel_names' (nnU-Net v2) or 'modality' (MSD)")
    channel_names = [str(raw_channels[k]) for k in sorted(raw_channels, key=int)]
    labels = _parse_labels(meta_path, meta.get("labels"))
    ending = str(meta.get("file_ending", ".nii.gz"))
    n = len(channel_names)
    training = find_cases(root / "imagesTr", root / "labelsTr", num_channels=n, file_ending=ending, strict=strict)
    if not training and strict:
        raise DatasetError(f"{root}: no training cases in imagesTr/")
    labels_ts = root / "labelsTs"
    test = find_cases(
        root / "imagesTs", labels_ts if labels_ts.is_dir() else None, num_channels=n, file_ending=ending, strict=strict
    )
    return DatasetInfo(
        root=root,
        name=str(meta.get("name", root.name)),
        channel_names=channel_names,
        label_names=labels,
        training=training,
        test=test,
        source=meta_path,
    )


# ----------------------------------------------------------------- YAML / CSV lists
class _CaseSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    group: str | None = None
    image: str | list[str]
    label: str | None = None


class _DiscoverSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    discover: str
    image: str | list[str]
    label: str | None = None
    id_from: str = "path"

    @field_validator("id_from")
    @classmethod
    def _id_from(cls, value: str) -> str:
        if value not in ("path", "name"):
            raise ValueError("id_from must be 'path' (relative folder path) or 'name' (folder name)")
        return value


_Section = list[_CaseSpec] | _DiscoverSpec | str | None


class _DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    root: str | None = None
    channels: list[str] | dict[int, str]
    labels: dict[int, str]
    group_pattern: str | None = None
    training: _Section = None
    validation: _Section = None
    test: _Section = None


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def _one_match(folder: Path, pattern: str) -> tuple[Path | None, str | None]:
    hits = sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))
    if len(hits) == 1:
        return hits[0], None
    if not hits:
        return None, f"nothing matches {pattern!r} in {folder}"
    return None, f"{len(hits)} entries match {pattern!r} in {folder} ({', '.join(h.name for h in hits[:4])})"


def _discover(spec: _DiscoverSpec, base: Path, num_channels: int) -> list[Case]:
    folders = sorted(p for p in base.glob(spec.discover) if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{base}: no case folders match {spec.discover!r}")
    patterns = [spec.image] if isinstance(spec.image, str) else list(spec.image)
    cases = []
    for folder in folders:
        rel = folder.relative_to(base)
        case_id = folder.name if spec.id_from == "name" else "_".join(rel.parts)
        problems: list[str] = []
        images: list[Path] = []
        for pattern in patterns:
            hit, problem = _one_match(folder, pattern)
            if hit is not None:
                images.append(hit)
            else:
                problems.append(f"channel {len(images) + len(problems)}: {problem}")
        label = None
        if spec.label is not None:
            label, problem = _one_match(folder, spec.label)
            if problem:
                problems.append(f"label: {problem}")
        cases.append(Case(case_id, images, label, problems=problems))
    if len(patterns) != num_channels:
        raise DatasetError(f"{base}: {len(patterns)} image pattern(s) for {num_channels} channel(s)")
    return cases


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[Case]]]:
    """Cases of a CSV file by split; also the channel names from the image column headers."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            header = list(rows[0].keys()) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read CSV ({exc})") from exc
    if not rows:
        raise DatasetError(f"{path}: no rows (an empty dataset)")
    image_cols = [c for c in header if c and (c == "image" or c.startswith(("image_", "image:")))]
    if not image_cols:
        raise DatasetError(f"{path}: needs an 'image' column (or image_<channel> columns); found {header}")
    names = [c[6:] if len(c) > 6 else f"channel{i}" for i, c in enumerate(image_cols)]
    splits: dict[str, list[Case]] = {"training": [], "validation": [], "test": []}
    aliases = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
    aliases["test"] = "test"
    problems = []
    for number, row in enumerate(rows, start=2):
        case_id = (row.get("case_id") or row.get("id") or "").strip()
        images = [_resolve(path.parent, row[c].strip()) for c in image_cols if (row.get(c) or "").strip()]
        if not case_id:
            case_id = split_suffix(images[0])[0] if images else f"row{number}"
        label_text = (row.get("label") or "").strip()
        split = aliases.get((row.get("split") or "train").strip().lower())
        if split is None:
            problems.append(f"line {number}: split {row.get('split')!r} is not train, val or test")
            continue
        case_problems = (
            [] if len(images) == len(image_cols) else [f"{len(image_cols) - len(images)} empty image cell(s)"]
        )
        group = (row.get("group") or "").strip() or None
        label = _resolve(path.parent, label_text) if label_text else None
        splits[split].append(Case(case_id, images, label, group=group, problems=case_problems))
    if problems:
        raise DatasetError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return names, splits


def _section(value: _Section, base: Path, num_channels: int, yaml_path: Path) -> tuple[list[Case], list[Case]]:
    """Cases of one YAML section; a CSV may also carry other splits (returned second: validation)."""
    if value is None:
        return [], []
    if isinstance(value, str):
        _, splits = _read_csv(_resolve(base, value))
        return splits["training"] + splits["test"], splits["validation"]
    if isinstance(value, _DiscoverSpec):
        return _discover(value, base, num_channels), []
    cases = []
    for index, spec in enumerate(value):
        images = [spec.image] if isinstance(spec.image, str) else list(spec.image)
        paths = [_resolve(base, p) for p in images]
        case_id = spec.id or (split_suffix(paths[0])[0] if paths else f"case{index}")
        label = _resolve(base, spec.label) if spec.label else None
        cases.append(Case(case_id, paths, label, group=spec.group))
    return cases, []


def _read_yaml_dataset(path: Path) -> DatasetInfo:
    from medseg.config import load_yaml

    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: a dataset description must be a mapping")
    try:
        spec = _DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:20]]
        raise DatasetError(f"{path}: invalid dataset description\n" + "\n".join(lines)) from None
    base = (_resolve(path.parent, spec.root) if spec.root else path.parent).resolve()
    if isinstance(spec.channels, dict):
        channel_names = [spec.channels[k] for k in sorted(spec.channels)]
    else:
        channel_names = list(spec.channels)
    if not channel_names:
        raise DatasetError(f"{path}: 'channels' is empty")
    labels = _parse_labels(path, {str(k): v for k, v in spec.labels.items()})
    n = len(channel_names)
    training, extra_val = _section(spec.training, base, n, path)
    validation, _ = _section(spec.validation, base, n, path)
    test, _ = _section(spec.test, base, n, path)
    return DatasetInfo(
        root=base,
        name=spec.name or path.stem,
        channel_names=channel_names,
        label_names=labels,
        training=training,
        validation=validation + extra_val,
        test=test,
        group_pattern=spec.group_pattern,
        source=path,
    )


def _read_csv_dataset(path: Path) -> DatasetInfo:
    names, splits = _read_csv(path)
    values: set[int] = set()
    for case in splits["training"] + splits["validation"]:
        if case.label is None:
            continue
        try:
            values |= set(np.unique(read_label(case.label).array).tolist())
        except MedsegError:
            continue  # reported by validate_dataset
    top = max(values | {1})
    labels = {0: "background", **{v: f"label_{v}" for v in range(1, top + 1)}}
    return DatasetInfo(
        root=path.parent,
        name=path.stem,
        channel_names=names,
        label_names=labels,
        training=splits["training"],
        validation=splits["validation"],
        test=splits["test"],
        source=path,
        labels_declared=False,
    )


def load_dataset(path: PathLike) -> DatasetInfo:
    """Read a dataset description: an MSD/nnU-Net folder, a ``dataset.json``, a YAML or a CSV file.

    Missing channels and labels are not raised here but recorded for :func:`validate_dataset`,
    so one report lists every problem.

    Raises:
        DatasetError: The path is none of these, or the description itself is malformed.
    """
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such dataset file or folder")
    if p.is_dir():
        if (p / "dataset.json").is_file():
            return read_dataset(p, strict=False)
        raise DatasetError(f"{p}: not a dataset (expected a folder with dataset.json, or a dataset .yaml / .csv file)")
    if p.name == "dataset.json":
        return read_dataset(p.parent, strict=False)
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _read_yaml_dataset(p)
    if suffix in (".csv", ".tsv"):
        return _read_csv_dataset(p)
    raise DatasetError(f"{p}: unknown dataset description (use a dataset folder, .yaml or .csv)")


def case_group(case: Case, pattern: str | None) -> str:
    """The patient key of a case: its ``group``, else ``pattern``'s first group (or match), else its id.

    Raises:
        DatasetError: ``pattern`` does not match the case id.
    """
    if case.group:
        return case.group
    if not pattern:
        return case.case_id
    match = re.search(pattern, case.case_id)
    if match is None:
        raise DatasetError(f"group pattern {pattern!r} does not match case id {case.case_id!r}")
    return match.group(1) if match.groups() else match.group(0)


# ----------------------------------------------------------------- reading and validating
def read_label(path: PathLike) -> Volume:
    """Load a label volume (file or DICOM series folder) as integers.

    Raises:
        InputError: Unreadable, non-integer or negative values, more than one channel.
    """
    # load_volume(kind="label") checks integrality, sign and channels for files and DICOM series alike
    # (medseg.io.images._as_labels) and stores the smallest unsigned dtype.
    return load_volume(Path(path), kind="label")


@dataclass
class CaseScan:
    """What one pass over a case found: problems and planning statistics.

    Attributes:
        case_id: The case.
        problems: Everything wrong with it (empty: fit to train on).
        warnings: Suspicious but usable (e.g. an empty label).
        spacing_ras: ``(3,)`` spacing along R, A, S (None when unreadable).
        shape_ras: ``(3,)`` voxel counts along R, A, S.
        label_counts: Voxels per label value.
        samples: Per channel, a random sample of intensities inside the label foreground.
        background_fraction: Per channel, the share of voxels equal to the image minimum.
    """

    case_id: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    spacing_ras: np.ndarray | None = None
    shape_ras: np.ndarray | None = None
    label_counts: dict[int, int] = field(default_factory=dict)
    samples: list[np.ndarray] = field(default_factory=list)
    background_fraction: list[float] = field(default_factory=list)


def _ras(affine: np.ndarray, values: Sequence[float]) -> np.ndarray:
    axis_of_voxel = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    out = np.empty(3)
    out[axis_of_voxel] = np.asarray(values, dtype=float)
    return out


def scan_case(
    case: Case,
    *,
    num_channels: int,
    label_names: dict[int, str],
    require_label: bool = True,
    samples: int = 10_000,
    rng: np.random.Generator | None = None,
) -> CaseScan:
    """Read one case fully; check it and collect statistics.

    Args:
        case: The case.
        num_channels: Channels the dataset declares.
        label_names: Declared classes (values outside are problems).
        require_label: A missing label is a problem (training cases).
        samples: Foreground intensity samples per channel.
        rng: Random generator for the samples.
    """
    rng = rng or np.random.default_rng(0)
    scan = CaseScan(case.case_id, problems=list(case.problems))
    channels: list[Volume] = []
    for index, path in enumerate(case.images):
        try:
            channels.append(load_volume(path))
        except MedsegError as exc:
            scan.problems.append(f"channel {index}: {exc}")
    found = sum(v.channels for v in channels)
    if channels and found != num_channels and not case.problems:
        scan.problems.append(f"{found} channel(s), the dataset declares {num_channels}")
    first = channels[0] if channels else None
    for index, other in enumerate(channels[1:], start=1):
        if not first.geometry.allclose(other.geometry, atol=GRID_ATOL):  # type: ignore[union-attr]
            scan.problems.append(
                f"channel {index} ({other.source}) is not on the grid of channel 0: "
                f"{other.geometry.describe()} vs {first.geometry.describe()}"  # type: ignore[union-attr]
            )
    label: Volume | None = None
    if case.label is None:
        if require_label and not any("label" in p for p in case.problems):
            scan.problems.append("no label")
    else:
        try:
            label = read_label(case.label)
        except MedsegError as exc:
            scan.problems.append(f"label: {exc}")
    if label is not None:
        counts = np.bincount(label.array.ravel().astype(np.int64))
        scan.label_counts = {int(v): int(c) for v, c in enumerate(counts) if c}
        unknown = sorted(v for v in scan.label_counts if v not in label_names)
        if unknown:
            scan.problems.append(
                f"label {label.source} has values {unknown} outside the declared classes {sorted(label_names)}"
            )
        if set(scan.label_counts) <= {0}:
            scan.warnings.append(f"label {label.source} is empty (background only)")
        if first is not None and not first.geometry.allclose(label.geometry, atol=GRID_ATOL):
            scan.problems.append(
                f"label {label.source} is not on the image grid: {label.geometry.describe()} vs "
                f"{first.geometry.describe()}"
            )
            label = None
    if first is not None:
        scan.spacing_ras = _ras(first.geometry.affine, first.geometry.spacing)
        scan.shape_ras = _ras(first.geometry.affine, first.geometry.shape)
        mask = label.array[0] > 0 if label is not None else None
        for volume in channels:
            for c in range(volume.channels):
                values = np.asarray(volume.array[c])
                scan.background_fraction.append(float(np.mean(values == values.min())) if values.size else 0.0)
                fg = values[mask] if mask is not None and mask.any() else values.ravel()
                take = min(samples, fg.size)
                scan.samples.append(rng.choice(fg, size=take, replace=False).astype(np.float32) if take else fg)
    return scan


def scan_dataset(
    cases: Sequence[Case], info: DatasetInfo, *, seed: int = 0, require_label: bool = True, progress: bool = False
) -> list[CaseScan]:
    """:func:`scan_case` for every case (deterministic sampling from ``seed``)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    return [
        scan_case(
            case,
            num_channels=len(info.channel_names),
            label_names=info.label_names,
            require_label=require_label,
            rng=rng,
        )
        for case in tqdm(cases, desc="read cases", disable=not progress, leave=False)
    ]


@dataclass
class ValidationReport:
    """Every problem of a dataset (and warnings), with the scans they came from."""

    dataset: str
    num_cases: int
    channel_names: list[str]
    label_names: dict[int, str]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scans: list[CaseScan] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problems (warnings allowed)."""
        return not self.problems

    def format(self) -> str:
        """Human-readable report: a summary line, then every problem and warning."""
        labels = ", ".join(f"{k}={v}" for k, v in sorted(self.label_names.items()))
        lines = [
            f"dataset {self.dataset}: {self.num_cases} training case(s), channels {self.channel_names}, "
            f"labels {{{labels}}}",
            f"  {len(self.problems)} problem(s)" + (":" if self.problems else ""),
        ]
        lines += [f"    - {p}" for p in self.problems]
        if self.warnings:
            lines.append(f"  {len(self.warnings)} warning(s):")
            lines += [f"    - {w}" for w in self.warnings]
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise :class:`DatasetError` with the whole report when there is any problem."""
        if self.problems:
            raise DatasetError(self.format())


def validate_dataset(
    info: DatasetInfo,
    *,
    seed: int = 0,
    group_pattern: str | None = None,
    progress: bool = False,
    expect_channels: Sequence[str] | None = None,
    expect_labels: dict[int, str] | None = None,
) -> ValidationReport:
    """Check every training (and fixed validation) case; list every problem, not the first.

    Checks: an empty dataset, duplicate case ids, missing or unreadable files, the channel
    count, all channels and the label on one grid (shape, spacing, origin, direction within
    :data:`GRID_ATOL`), label values within the declared classes, the group pattern; with a
    plan, its channels and labels against the dataset's.

    Args:
        info: The dataset.
        seed: Seed of the intensity sampling (the scans are reused for planning).
        group_pattern: Patient-key regex to check against every case id.
        progress: Progress bar over cases.
        expect_channels: Channel names of a given plan.
        expect_labels: Labels of a given plan.
    """
    cases = info.training + info.validation
    report = ValidationReport(
        dataset=str(info.source or info.root),
        num_cases=len(info.training),
        channel_names=list(info.channel_names),
        label_names=dict(info.label_names),
    )
    if not cases:
        report.problems.append("no training cases (an empty dataset)")
        return report
    seen: dict[str, int] = {}
    for case in cases:
        seen[case.case_id] = seen.get(case.case_id, 0) + 1
    for case_id, count in sorted(seen.items()):
        if count > 1:
            report.problems.append(f"case id {case_id!r} appears {count} times")
    pattern = group_pattern or info.group_pattern
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            report.problems.append(f"group pattern {pattern!r} is not a valid regex ({exc})")
            pattern = None
    if expect_channels is not None and len(expect_channels) != len(info.channel_names):
        report.problems.append(
            f"the plan has {len(expect_channels)} channel(s) {list(expect_channels)}, "
            f"the dataset {len(info.channel_names)} {info.channel_names}"
        )
    if expect_labels is not None and dict(expect_labels) != dict(info.label_names):
        report.problems.append(f"the plan's labels {dict(expect_labels)} differ from the dataset's {info.label_names}")
    if not info.labels_declared:
        report.warnings.append(f"label names not declared; using the values found: {info.label_names}")
    report.scans = scan_dataset(cases, info, seed=seed, progress=progress)
    seen_values: set[int] = set()
    for case, scan in zip(cases, report.scans, strict=True):
        report.problems += [f"{case.case_id}: {p}" for p in scan.problems]
        report.warnings += [f"{case.case_id}: {w}" for w in scan.warnings]
        seen_values |= set(scan.label_counts)
        if pattern:
            try:
                case_group(case, pattern)
            except DatasetError as exc:
                report.problems.append(f"{case.case_id}: {exc}")
    absent = sorted(set(info.label_names) - seen_values)
    if absent and any(s.label_counts for s in report.scans):
        names = ", ".join(f"{v} ({info.label_names[v]})" for v in absent)
        report.warnings.append(f"declared classes never present in any label: {names}")
    return report
