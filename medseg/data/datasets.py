"""Datasets in the MSD / nnU-Net layout.

Supported: nnU-Net v2 (``dataset.json`` with ``channel_names`` and ``labels`` as
``name -> value``; images ``<case>_<channel:04d><file_ending>``) and MSD / nnU-Net v1
(``modality`` and ``labels`` as ``"value" -> name``).  Held-out cases live in
``imagesTs/`` with optional references in ``labelsTs/``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import DatasetError
from medseg.io.images import split_suffix
from medseg.types import PathLike

__all__ = ["Case", "DatasetInfo", "find_cases", "read_dataset"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class Case:
    """One case: its channel images (in channel order) and optional label."""

    case_id: str
    images: list[Path]
    label: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The MONAI data-dictionary form (``{"image": [...], "label": ...}``)."""
        item: dict[str, Any] = {"case_id": self.case_id, "image": [str(p) for p in self.images]}
        if self.label is not None:
            item["label"] = str(self.label)
        return item


@dataclass
class DatasetInfo:
    """A dataset folder's description and cases.

    Attributes:
        root: The dataset folder.
        name: Dataset name.
        channel_names: Channel names in order (``["CT"]``, ``["T1", "T2"]``).
        label_names: ``{value: name}`` including background 0.
        training: Cases in ``imagesTr``/``labelsTr``.
        test: Cases in ``imagesTs`` (labels from ``labelsTs`` when present).
    """

    root: Path
    name: str
    channel_names: list[str]
    label_names: dict[int, str]
    training: list[Case] = field(default_factory=list)
    test: list[Case] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of output classes including background."""
        return max(self.label_names) + 1


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


def find_cases(images_dir: Path, labels_dir: Path | None, *, num_channels: int, file_ending: str) -> list[Case]:
    """Match ``<case>_<cccc><ending>`` images with ``<case><ending>`` labels.

    Raises:
        DatasetError: Listing every case with missing channels or a missing label.
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
        if sorted(found) != list(range(num_channels)):
            problems.append(f"{case_id}: channels {sorted(found)} found, expected 0..{num_channels - 1}")
            continue
        label = None
        if labels_dir is not None:
            candidate = labels_dir / f"{case_id}{file_ending}"
            if candidate.is_file():
                label = candidate
            else:
                problems.append(f"{case_id}: no label {candidate}")
        cases.append(Case(case_id, [found[c] for c in range(num_channels)], label))
    if problems:
        raise DatasetError(f"{images_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return cases


def read_dataset(root: PathLike) -> DatasetInfo:
    """Read a dataset folder (``dataset.json`` + ``imagesTr``/``labelsTr`` [+ ``imagesTs``/``labelsTs``]).

    Raises:
        DatasetError: Missing ``dataset.json``, unknown layout or inconsistent cases.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DatasetError(f"{root}: not a dataset folder (no dataset.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: invalid JSON ({exc})") from exc
    raw_channels = meta.get("channel_names", meta.get("modality"))
    if not isinstance(raw_channels, dict) or not raw_channels:
        raise DatasetError(f"{meta_path}: needs 'channel_names' (nnU-Net v2) or 'modality' (MSD)")
    channel_names = [str(raw_channels[k]) for k in sorted(raw_channels, key=int)]
    labels = _parse_labels(meta_path, meta.get("labels"))
    ending = str(meta.get("file_ending", ".nii.gz"))
    n = len(channel_names)
    training = find_cases(root / "imagesTr", root / "labelsTr", num_channels=n, file_ending=ending)
    if not training:
        raise DatasetError(f"{root}: no training cases in imagesTr/")
    labels_ts = root / "labelsTs"
    test = find_cases(root / "imagesTs", labels_ts if labels_ts.is_dir() else None, num_channels=n, file_ending=ending)
    return DatasetInfo(
        root=root,
        name=str(meta.get("name", root.name)),
        channel_names=channel_names,
        label_names=labels,
        training=training,
        test=test,
    )
