"""Predict many inputs into a folder: case grouping, atomic outputs, per-case report.

Inputs are files (NIfTI/NRRD/MHA, nnU-Net channel naming ``<case>_0000`` ...),
folders of such files, or DICOM series folders (one case each).  A case that fails
is recorded with its reason and the run continues; nothing partial is left behind.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medseg.config import dump_yaml
from medseg.errors import InputError, MedsegError
from medseg.infer.outputs import probability_path, write_probabilities
from medseg.infer.predictor import Predictor, ProbabilityDtype
from medseg.io import VOLUME_SUFFIXES, is_dicom_file, load_volume, split_suffix, write_volume
from medseg.types import PathLike

__all__ = ["CaseInput", "group_inputs", "predict_to_folder"]

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass
class CaseInput:
    """The channel sources of one case, in channel order."""

    case_id: str
    sources: list[Path]


def _expand(path: Path) -> list[Path]:
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file():
        return [path]
    volumes = sorted(p for p in path.iterdir() if p.is_file() and split_suffix(p)[1] in VOLUME_SUFFIXES)
    return volumes or [path]  # a folder without volume files is a DICOM series folder


def group_inputs(inputs: Sequence[PathLike], *, num_channels: int) -> list[CaseInput]:
    """Group input paths into cases.

    ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz`` ... form one case; other files and
    DICOM folders are single-channel cases named after the file stem / folder.

    Raises:
        InputError: A case has the wrong channels (all such cases are listed).
    """
    grouped: dict[str, dict[int, Path]] = {}
    for raw in inputs:
        for path in _expand(Path(raw)):
            if path.is_dir() or (path.is_file() and split_suffix(path)[1] not in VOLUME_SUFFIXES):
                if path.is_file() and not is_dicom_file(path):
                    raise InputError(path, "not a volume file (.nii.gz, .nii, .nrrd, .mha) nor DICOM")
                grouped.setdefault(path.name if path.is_dir() else path.stem, {})[0] = path
                continue
            stem, _ = split_suffix(path)
            match = _CHANNEL_RE.match(stem)
            case_id, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
            grouped.setdefault(case_id, {})[channel] = path
    problems = [
        f"{case_id}: channels {sorted(ch)} (model needs 0..{num_channels - 1})"
        for case_id, ch in grouped.items()
        if sorted(ch) != list(range(num_channels))
    ]
    if problems:
        raise InputError(", ".join(map(str, inputs)), "inputs do not form complete cases: " + "; ".join(problems))
    return [CaseInput(case_id, [ch[i] for i in range(num_channels)]) for case_id, ch in sorted(grouped.items())]


def predict_to_folder(
    predictor: Predictor,
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    suffix: str = ".nii.gz",
    progress: bool = True,
    probabilities: ProbabilityDtype | None = None,
) -> list[dict[str, Any]]:
    """Predict every case and write ``<case><suffix>`` label volumes on the input grids.

    Also writes ``prediction.yaml`` (model, settings, per-case status and timings) in
    ``out_dir``.  A failing case is recorded (``status: failed`` with its error) and the
    run continues; none of its outputs is left behind.

    Args:
        predictor: The predictor (model(s) and settings).
        inputs: Files, folders of files, or DICOM series folders.
        out_dir: Output folder.
        overwrite: Replace existing outputs.
        suffix: Label file format (``.nii.gz``, ``.nrrd``, ``.mha`` ...).
        progress: Progress bar over cases.
        probabilities: Also write ``<case>_probabilities.nii.gz`` (``K`` channels on the
            input grid) as ``uint8``/``uint16`` (scaled by ``scl_slope``) or ``float32``.

    Returns:
        One record per case.
    """
    out = Path(out_dir)
    cases = group_inputs(inputs, num_channels=predictor.num_channels)
    records: list[dict[str, Any]] = []
    bar = tqdm(cases, desc="predict", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id)
        target = out / f"{case.case_id}{suffix}"
        prob_target = probability_path(target) if probabilities else None
        record: dict[str, Any] = {"case": case.case_id, "inputs": [str(s) for s in case.sources]}
        written: list[Path] = []
        t0 = time.perf_counter()
        try:
            for path in (target, prob_target):
                if path is not None and path.exists() and not overwrite:
                    raise MedsegError(f"{path}: output exists (pass --overwrite to replace it)")
            t_read = time.perf_counter()
            channels = [load_volume(s) for s in case.sources]
            read_s = time.perf_counter() - t_read
            result = predictor.predict_case(channels, probabilities=probabilities)
            del channels
            t_write = time.perf_counter()
            if result.probabilities is not None and prob_target is not None:
                written.append(write_probabilities(result.probabilities, prob_target, overwrite=overwrite))
            written.append(write_volume(result.labels, target, overwrite=overwrite, label_names=predictor.label_names))
            outputs = {"output": str(target)}
            if prob_target is not None:
                outputs["probabilities"] = str(prob_target)
            record.update(
                status="done",
                **outputs,
                read_s=round(read_s, 4),
                **result.timings,
                write_s=round(time.perf_counter() - t_write, 4),
            )
        except (MedsegError, MemoryError) as exc:
            for path in written:
                path.unlink(missing_ok=True)
            reason = str(exc) if isinstance(exc, MedsegError) else f"{case.sources[0]}: out of memory ({exc})"
            record.update(status="failed", error=reason)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(record)
    dump_yaml({**predictor.describe(), "cases": records}, out / "prediction.yaml", overwrite=True)
    return records
