"""``medseg evaluate`` on DICOM SEG files, DICOM mask series folders and ``medseg batch`` output folders.

Real data: the PGBM-001 studies (T1post + MaskTumor series).  The batch output folder is laid out as
:mod:`medseg.batch.runner` documents (``OUT/<study>/<series>/segmentation.nii.gz`` + marker) from a
perturbed mask, so the expected Dice is known from a plain numpy computation.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from medseg.batch.runner import MARKER, series_dir_name
from medseg.errors import ConfigError
from medseg.evaluate.api import evaluate_folders
from medseg.evaluate.cli import add_evaluate_parser
from medseg.evaluate.inputs import find_case_files, parse_label_names
from medseg.io import read_dicom_series, write_volume
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.volume import Volume


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / (np.sum(a) + np.sum(b)))


@pytest.fixture(scope="module")
def pgbm(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Per PGBM-001 study: the T1post folder, its image, its tumour mask and a perturbed 'prediction'."""
    patient = shared_data / "pgbm-brain-tumor-progression" / "PGBM-001"
    if not patient.is_dir():
        pytest.skip("pgbm-brain-tumor-progression not available")
    root = tmp_path_factory.mktemp("pgbm")
    masks_dir = root / "masks"  # reference: a folder holding only the mask series
    studies = []
    for index, study in enumerate(sorted(p for p in patient.iterdir() if p.is_dir())):
        t1_dir = next(p for p in study.iterdir() if "T1post" in p.name)
        mask_dir = next(p for p in study.iterdir() if "MaskTumor" in p.name)
        (masks_dir / study.name / mask_dir.name).mkdir(parents=True)
        for file in mask_dir.iterdir():  # (discovery does not follow directory links)
            os.symlink(file, masks_dir / study.name / mask_dir.name / file.name)
        t1 = read_dicom_series(t1_dir)
        mask = read_dicom_series(mask_dir).array[0] > 0
        pred = mask.copy()
        pred[:, :, pred.shape[2] // 2] = False  # drop one slice of the tumour
        pred[100 + 10 * index : 130 + 10 * index, 100:130, 5:8] = True  # and add a false positive
        studies.append({"t1_dir": t1_dir, "t1": t1, "mask": mask, "pred": pred, "masks": masks_dir / study.name})
    return {"root": root, "masks": masks_dir, "studies": studies}


def _batch_tree(out: Path, studies: list[dict]) -> Path:
    """A medseg batch output folder holding the perturbed predictions (as the runner lays it out)."""
    for study in studies:
        t1: Volume = study["t1"]
        meta = t1.meta
        folder = out / series_dir_name(
            key=meta["series_key"],
            study_uid=meta["study_uid"],
            series_number=meta["series_number"],
            description=meta["series_description"],
        )
        label = Volume(study["pred"][None].astype(np.uint8), t1.geometry, kind="label")
        write_volume(label, folder / "segmentation.nii.gz", label_names={1: "tumour"})
        marker = {"key": meta["series_key"], "series_uid": meta["series_uid"], "study_uid": meta["study_uid"]}
        (folder / MARKER).write_text(json.dumps(marker))
    (out / "summary.json").write_text("{}")
    return out


def test_batch_output_against_dicom_mask_series(pgbm: dict, tmp_path: Path) -> None:
    studies = pgbm["studies"]
    batch = _batch_tree(tmp_path / "batch", studies)
    found = find_case_files(batch, what="prediction")
    assert len(found.files) == 2 and all("/" in case for case in found.files)  # <study>/<series>
    refs = find_case_files(pgbm["masks"], what="reference")
    assert len(refs.files) == 2 and all(item.series is not None for item in refs.files.values())
    summary = evaluate_folders(batch, pgbm["masks"], out_dir=tmp_path / "report", label_names={1: "tumour"})
    assert summary["n_cases"] == 2 and summary["n_problems"] == 0  # paired by study: names differ
    expected = [_dice(s["pred"], s["mask"]) for s in studies]
    assert summary["classes"]["tumour"]["dice"]["mean"] == pytest.approx(np.mean(expected), abs=1e-9)
    rows = (tmp_path / "report" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3


def test_medseg_seg_as_prediction_against_a_mask_series(pgbm: dict, tmp_path: Path) -> None:
    study = pgbm["studies"][0]
    seg = write_dicom_seg(
        Volume(study["pred"][None].astype(np.uint8), study["t1"].geometry, kind="label"),
        study["t1_dir"],
        tmp_path / "pred" / "seg.dcm",
        label_names={1: "tumour"},
    )
    mask_series = study["masks"]
    summary = evaluate_folders(seg, mask_series, out_dir=tmp_path / "report")
    assert summary["n_cases"] == 1 and summary["n_problems"] == 0
    assert summary["classes"]["label_1"]["dice"]["mean"] == pytest.approx(_dice(study["pred"], study["mask"]))
    # The same with the SEG as the reference and names from the command line.
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "evaluate",
            "--pred",
            str(mask_series),
            "--ref",
            str(seg),
            "--out",
            str(tmp_path / "r2"),
            "--label-names",
            "1=tumour",
        ]
    )
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert list(summary["classes"]) == ["tumour"]
    assert summary["classes"]["tumour"]["dice"]["mean"] == pytest.approx(_dice(study["pred"], study["mask"]))


def test_unpaired_cases_are_reported_not_guessed(pgbm: dict, tmp_path: Path) -> None:
    batch = _batch_tree(tmp_path / "batch", pgbm["studies"][:1])
    summary = evaluate_folders(batch, pgbm["masks"], out_dir=tmp_path / "report", label_names={1: "tumour"})
    assert summary["n_cases"] == 1
    assert [p["kind"] for p in summary["problems"]] == ["missing_prediction"]


def test_parse_label_names() -> None:
    assert parse_label_names("1=tumour, 2=edema") == {1: "tumour", 2: "edema"}
    for bad in ("tumour", "0=background", "1=", "x=y", "1=a,1=b", ""):
        with pytest.raises(ConfigError, match="--label-names"):
            parse_label_names(bad)
