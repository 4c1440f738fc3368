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
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

from medseg.config import dump_yaml
from medseg.errors import ConfigError, InputError, MedsegError
from medseg.infer.outputs import probability_path, write_probabilities
from medseg.infer.predictor import Predictor, ProbabilityDtype
from medseg.io import VOLUME_SUFFIXES, Volume, is_dicom_file, load_volume, split_suffix
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


def _load_channel(path: Path, series: str | None) -> Volume:
    """One input channel; ``series`` picks a series (UID, key or SeriesNumber) of a DICOM folder."""
    from medseg.io.dicom import read_dicom_series

    if series is not None and (path.is_dir() or (path.is_file() and split_suffix(path)[1] not in VOLUME_SUFFIXES)):
        return read_dicom_series(path, series_uid=series)
    return load_volume(path)


def _previous_record(path: Path) -> dict[str, Any]:
    """An existing ``prediction.yaml`` as format 2 (``runs`` + cases whose outputs name their run)."""
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    if data.get("format") == 2:
        return data
    settings = {k: v for k, v in data.items() if k != "cases"}  # format 1: one run, settings at the top
    cases = []
    for case in data.get("cases") or []:
        if isinstance(case, dict):
            case = dict(case)
            case["run"] = 1
            if case.get("status") == "done" and case.get("output"):
                case["outputs"] = {"nifti": {"files": [Path(str(case["output"])).name], "run": 1}}
            cases.append(case)
    return {"format": 2, "runs": {1: settings}, "cases": cases}


def _merge_case(old: dict[str, Any] | None, new: dict[str, Any], run: int) -> dict[str, Any]:
    """This run's record of a case, keeping the provenance of outputs it did not (re)write."""
    outputs: dict[str, Any] = dict((old or {}).get("outputs") or {})
    for kind, entry in (new.get("outputs") or {}).items():
        if entry.get("kept"):  # not rewritten: keep the record of the run that made it
            outputs[kind] = outputs.get(kind) or {"files": entry["files"], "run": None, "note": "not made by this run"}
        elif "files" in entry or kind not in outputs or "files" not in outputs[kind]:
            outputs[kind] = {**entry, "run": run}
        else:  # failed or refused this time: the existing file and its record stay
            outputs[kind] = {**outputs[kind], "last_error": entry.get("error"), "last_error_run": run}
    merged = {**new, "outputs": outputs}
    if old is not None and new.get("status") == "failed" and any("files" in e for e in outputs.values()):
        merged = {**old, "outputs": outputs, "last_error": new.get("error"), "last_error_run": run}
    return merged


def predict_to_folder(
    predictor: Predictor,
    inputs: Sequence[PathLike],
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    suffix: str = ".nii.gz",
    progress: bool = True,
    probabilities: ProbabilityDtype | None = None,
    outputs: Sequence[str] = ("nifti",),
    series: str | None = None,
    seg_type: Literal["binary", "labelmap"] = "binary",
) -> list[dict[str, Any]]:
    """Predict every case and write its outputs (label volume on the input grid, DICOM SEG, RTSTRUCT, volumes).

    Also writes ``prediction.yaml`` in ``out_dir``: the settings of this run at the top (model,
    device, precision, ``infer``), every run that produced a file still listed under ``runs``, and
    one record per case (status, inputs, timings, and per output its files and the ``run`` that
    wrote them).  An earlier record is never lost: outputs this run did not write (they exist and
    ``overwrite`` is off, or writing them failed) keep the record of the run that made them.

    A failing case is recorded (``status: failed`` with its error) and the run continues; none of
    its outputs is left behind.  Outputs are independent (:func:`medseg.infer.writers.write_outputs`):
    a SEG that cannot be written (e.g. the input is not a DICOM series) does not cost the NIfTI.

    Args:
        predictor: The predictor (model(s) and settings).
        inputs: Files, folders of files, or DICOM series folders.
        out_dir: Output folder.
        overwrite: Replace existing outputs.
        suffix: Label file format (``.nii.gz``, ``.nrrd``, ``.mha`` ...).
        progress: Progress bar over cases (only on a terminal: no escape codes in logs).
        probabilities: Also write ``<case>_probabilities.nii.gz`` (``K`` channels on the
            input grid) as ``uint8``/``uint16`` (scaled by ``scl_slope``) or ``float32``.
        outputs: Any of ``nifti`` (``<case><suffix>``), ``seg`` (``<case>_seg.dcm``), ``rtstruct``
            (``<case>_rtstruct.dcm``), ``json`` (``<case>_volumes.json``).
        series: For DICOM folders holding several series: the one to segment (UID, key or SeriesNumber).
        seg_type: DICOM SEG encoding.

    Returns:
        One record per case of this run (``status``: ``done``, ``partial`` - some outputs failed -,
        ``exists`` - every output exists and ``overwrite`` is off -, or ``failed``).
    """
    from medseg.infer.writers import OutputNames, parse_output_list, write_outputs

    try:
        kinds = parse_output_list(outputs)
    except ValueError as exc:
        raise ConfigError(f"outputs: {exc}") from None
    out = Path(out_dir)
    cases = group_inputs(inputs, num_channels=predictor.num_channels)
    records: list[dict[str, Any]] = []
    bar = tqdm(cases, desc="predict", unit="case", disable=None if progress else True)
    started = time.time()
    for case in bar:
        bar.set_postfix_str(case.case_id)
        names = OutputNames.for_case(case.case_id, suffix=suffix)
        target = out / names.nifti
        prob_target = probability_path(target) if probabilities else None
        record: dict[str, Any] = {"case": case.case_id, "inputs": [str(s) for s in case.sources]}
        written: list[Path] = []
        t0 = time.perf_counter()
        try:
            present = {k for k in kinds if any((out / f).exists() for f in names.files(k)[:1])}
            todo = [k for k in kinds if overwrite or k not in present]
            if not todo and (prob_target is None or prob_target.exists()) and not overwrite:
                shown = ", ".join(str(out / names.files(k)[0]) for k in kinds)
                record.update(status="exists", error=f"{shown}: output exists (pass --overwrite to replace it)")
                raise _Exists
            if prob_target is not None and prob_target.exists() and not overwrite:
                raise MedsegError(f"{prob_target}: output exists (pass --overwrite to replace it)")
            t_read = time.perf_counter()
            channels = [_load_channel(s, series) for s in case.sources]
            read_s = time.perf_counter() - t_read
            result = predictor.predict_case(channels, probabilities=probabilities)
            t_write = time.perf_counter()
            if result.probabilities is not None and prob_target is not None:
                written.append(write_probabilities(result.probabilities, prob_target, overwrite=overwrite))
            results = write_outputs(
                result.labels,
                out,
                outputs=todo,
                names=names,
                label_names=predictor.label_names,
                image=channels[0],
                seg_type=seg_type,
                description=str(channels[0].meta.get("series_description") or ""),
                report={"case": case.case_id, "inputs": record["inputs"], "model": predictor.describe()["model"]},
                overwrite=overwrite,
            )
            del channels
            status = {kind: r.as_dict() for kind, r in results.items()}
            for kind in kinds:
                if kind not in results:  # exists and not overwritten: its earlier record stays
                    status[kind] = {"files": names.files(kind), "kept": True}
            failed = {kind: r.error for kind, r in results.items() if not r.ok}
            if len(failed) == len(results):
                for path in written:
                    path.unlink(missing_ok=True)
                raise MedsegError("; ".join(f"{kind}: {why}" for kind, why in failed.items()))
            extra = {"output": str(target)} if "nifti" in results and results["nifti"].ok else {}
            if prob_target is not None:
                extra["probabilities"] = str(prob_target)
            record.update(
                status="partial" if failed else "done",
                **extra,
                outputs=status,
                read_s=round(read_s, 4),
                **result.timings,
                write_s=round(time.perf_counter() - t_write, 4),
            )
            if failed:
                record["error"] = "; ".join(f"{kind} failed: {why}" for kind, why in failed.items())
        except _Exists:
            pass
        except (MedsegError, MemoryError) as exc:
            for path in written:
                path.unlink(missing_ok=True)
            reason = str(exc) if isinstance(exc, MedsegError) else f"{case.sources[0]}: out of memory ({exc})"
            record.update(status="failed", error=reason)
        record["seconds"] = round(time.perf_counter() - t0, 3)
        records.append(record)
    _write_record(out / "prediction.yaml", predictor, records, started=started)
    return records


class _Exists(Exception):
    """Every output of a case exists (not an error: the case is skipped)."""


def _write_record(path: Path, predictor: Predictor, records: list[dict[str, Any]], *, started: float) -> None:
    """Merge this run into ``prediction.yaml`` without losing how existing outputs were made."""
    import medseg

    previous = _previous_record(path)
    runs: dict[int, Any] = {int(k): v for k, v in (previous.get("runs") or {}).items()}
    run = max(runs, default=0) + 1
    settings = {**predictor.describe(), "medseg": medseg.__version__, "started_at": round(started, 3)}
    runs[run] = settings
    cases: dict[str, dict[str, Any]] = {str(c.get("case")): c for c in previous.get("cases") or []}
    for record in records:
        if record["status"] == "exists":
            continue  # nothing was made: the existing record stays as it is
        cases[record["case"]] = _merge_case(cases.get(record["case"]), {**record, "run": run}, run)
    used = {int(c.get("run", 0)) for c in cases.values()} | {
        int(o.get("run", 0)) for c in cases.values() for o in (c.get("outputs") or {}).values()
    }
    data = {
        "format": 2,
        **predictor.describe(),
        "run": run,
        "runs": {k: v for k, v in sorted(runs.items()) if k in used or k == run},
        "cases": sorted(cases.values(), key=lambda c: str(c.get("case"))),
    }
    dump_yaml(data, path, overwrite=True)
