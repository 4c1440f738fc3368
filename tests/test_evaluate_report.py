"""evaluate_folders / ``medseg evaluate``: bad input, regions, label names, resampling, DICOM SEG,
a multi-class report on real anatomy, and the HTML page rendered by headless Chromium."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medseg.evaluate import evaluate_folders, load_label_names, load_regions, surface_metrics
from medseg.evaluate.cli import add_evaluate_parser
from medseg.io import Geometry, Volume, load_volume, write_volume

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOTALSEG = SHARED / "totalseg-tests"
SPACING = (0.9, 0.9, 2.5)
ORIGIN = (-20.0, 15.0, 7.5)


def labels_pair(seed: int, shape: tuple[int, int, int] = (28, 24, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Reference with classes 1..3 (3 = two small lesions) and a perturbed prediction."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3)
    ref = np.digitize(field, np.quantile(field, [0.5, 0.75])).astype(np.uint8)
    ref[3:6, 3:6, 2:5] = 3
    ref[20:23, 17:20, 6:9] = 3
    noisy = field + 0.4 * ndimage.gaussian_filter(rng.standard_normal(shape), 2)
    pred = np.digitize(noisy, np.quantile(field, [0.5, 0.75])).astype(np.uint8)
    pred[3:6, 4:7, 2:5] = 3
    return pred, ref


def write(folder: Path, name: str, array: np.ndarray, *, spacing=SPACING, origin=ORIGIN, kind="label") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    geometry = Geometry.from_itk(shape=array.shape, spacing=spacing, origin=origin, direction=np.eye(3))
    return write_volume(Volume(array[None], geometry, kind=kind), folder / name)  # type: ignore[arg-type]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


NAMES = {1: "organ", 2: "core", 3: "lesion"}


# ------------------------------------------------------------------ bad input
@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, Path]:
    """Good cases a, b; c without prediction; d without reference; e unreadable; f on another grid;
    g with an undeclared label; h twice on the prediction side."""
    preds, refs = tmp_path / "pred", tmp_path / "ref"
    for i, case in enumerate("abcefgh"):
        pred, ref = labels_pair(i)
        write(refs, f"{case}.nii.gz", ref)
        if case == "c":
            continue
        if case == "f":
            write(preds, "f.nii.gz", pred, origin=(-20.0, 15.0, 10.0))
        elif case == "g":
            pred[0:2, 0:2, 0:2] = 7
            write(preds, "g.nii.gz", pred)
        else:
            write(preds, f"{case}.nii.gz", pred)
    write(preds, "h.nrrd", labels_pair(9)[0])
    write(preds, "d.nii.gz", labels_pair(5)[0])
    (preds / "e.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a gzip stream")
    return preds, refs


def test_bad_input_is_listed_and_other_cases_evaluated(messy: tuple[Path, Path], tmp_path: Path) -> None:
    preds, refs = messy
    out = tmp_path / "report"
    seen = []
    summary = evaluate_folders(preds, refs, out_dir=out, label_names=NAMES, max_overlays=2, on_problem=seen.append)
    kinds = {(p["case"], p["kind"]) for p in summary["problems"]}
    assert kinds == {
        ("c", "missing_prediction"),
        ("d", "missing_reference"),
        ("e", "unreadable"),
        ("f", "geometry"),
        ("g", "unexpected_labels"),
        ("h", "duplicate_case"),
    }
    assert [p.kind for p in seen] == [p["kind"] for p in summary["problems"]]
    assert summary["cases"] == ["a", "b", "g"]  # g is scored on the declared classes
    assert summary["cases_not_evaluated"] == ["c", "d", "e", "f", "h"]
    messages = {p["case"]: p["message"] for p in summary["problems"]}
    assert "e.nii.gz" in messages["e"]
    assert "[7]" in messages["g"] and "g.nii.gz" in messages["g"]
    assert "--resample-to-ref" in messages["f"] and "origin" in messages["f"]
    assert "h.nii.gz" in messages["h"] and "h.nrrd" in messages["h"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["problems"] == summary["problems"] and on_disk["n_problems"] == 6
    assert {r["case"] for r in read_csv(out / "metrics.csv")} == {"a", "b", "g"}
    page = (out / "report.html").read_text()
    assert "Problems (6)" in page and "missing_prediction" in page
    assert "## Problems" in (out / "report.md").read_text()


def test_resample_to_reference_recovers_the_reference_grid(tmp_path: Path) -> None:
    pred, ref = labels_pair(3)
    refs, preds = tmp_path / "ref", tmp_path / "pred"
    write(refs, "x.nii.gz", ref)
    # The same labels on a grid with half the spacing and flipped first axis (same physical content).
    fine = np.repeat(np.repeat(np.repeat(pred, 2, axis=0), 2, axis=1), 2, axis=2)[::-1]
    half = tuple(s / 2 for s in SPACING)
    lps_origin = np.array(ORIGIN) - np.array(half) / 2  # centre of the first fine voxel
    direction = np.diag([-1.0, 1.0, 1.0])
    lps_origin[0] += (fine.shape[0] - 1) * half[0]  # first fine voxel along the flipped axis
    geometry = Geometry.from_itk(shape=fine.shape, spacing=half, origin=tuple(lps_origin), direction=direction)
    write_volume(Volume(fine[None], geometry, kind="label"), preds / "x.nrrd")
    not_resampled = evaluate_folders(preds, refs, out_dir=tmp_path / "a", label_names=NAMES, max_overlays=0)
    assert [p["kind"] for p in not_resampled["problems"]] == ["geometry"]
    summary = evaluate_folders(
        preds, refs, out_dir=tmp_path / "b", label_names=NAMES, max_overlays=0, resample_to_ref=True
    )
    assert summary["problems"] == [] and summary["options"]["resample_to_ref"] is True
    direct = {row["name"]: row for row in read_csv(tmp_path / "b" / "metrics.csv")}
    for value, name in NAMES.items():
        p, r = pred == value, ref == value
        assert float(direct[name]["dice"]) == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-12)


def test_regions_label_names_and_lesions(tmp_path: Path) -> None:
    pred, ref = labels_pair(11)
    write(tmp_path / "ref", "k.nii.gz", ref)
    write(tmp_path / "pred", "k.nii.gz", pred)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "core": 2, "lesion": 3, "tumour": [2, 3]}}))
    names, dataset_regions = load_label_names(dataset)
    assert names == NAMES and dataset_regions == {"tumour": [2, 3]}
    regions = {**dataset_regions, **load_regions('{"all": ["organ", 2, 3]}')}
    summary = evaluate_folders(
        tmp_path / "pred", tmp_path / "ref", out_dir=tmp_path / "r", label_names=names, regions=regions, max_overlays=1
    )
    assert list(summary["regions"]) == ["tumour", "all"]
    assert summary["region_definitions"] == {"tumour": [2, 3], "all": [1, 2, 3]}
    rows = {r["name"]: r for r in read_csv(tmp_path / "r" / "metrics.csv")}
    assert rows["all"]["kind"] == "region" and rows["all"]["label"] == "1+2+3"
    p, r = pred > 0, ref > 0
    spacing = load_volume(tmp_path / "ref" / "k.nii.gz").geometry.spacing  # as stored (float32 in NIfTI)
    expected = surface_metrics(p, r, spacing=spacing, tolerance_mm=2.0)
    assert float(rows["all"]["dice"]) == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-12)
    assert float(rows["all"]["hd95_mm"]) == pytest.approx(expected["hd95_mm"], abs=1e-9)
    assert float(rows["all"]["nsd"]) == pytest.approx(expected["nsd"], abs=1e-12)
    # Lesion class: two reference lesions, one found (shifted by a voxel), one missed.
    lesion = rows["lesion"]
    assert (lesion["ref_lesions"], lesion["lesion_tp"], lesion["lesion_fn"]) == ("2", "1", "1")
    lesions = [row for row in read_csv(tmp_path / "r" / "lesions.csv") if row["name"] == "lesion"]
    assert sorted(row["status"] for row in lesions) == ["FN", "TP"]
    assert float(next(row for row in lesions if row["status"] == "TP")["dice"]) == pytest.approx(2 * 18 / 54)
    assert summary["classes"]["lesion"]["lesions"]["sensitivity"] == 0.5


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medseg")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *argv])
    return int(args.func(args))


def test_cli_exit_codes_and_stderr(messy: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds, refs = messy
    model = tmp_path / "model"
    model.mkdir()
    (model / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "organ", "2": "core", "3": "lesion"}})
    )
    common = ["--pred", str(preds), "--ref", str(refs), "--labels", str(model), "--max-overlays", "1"]
    assert run_cli([*common, "--out", str(tmp_path / "o1"), "--regions", '{"fg": [1, 2, 3]}']) == 0
    captured = capsys.readouterr()
    assert "problem [missing_prediction]: c:" in captured.err and "problem [geometry]: f:" in captured.err
    assert "organ" in captured.out and "fg (region)" in captured.out and "report.html" in captured.out
    common[-1] = "0"  # no overlays from here on
    assert run_cli([*common, "--out", str(tmp_path / "o2"), "--strict"]) == 1
    # With the grid mismatch resampled, f is evaluated; the other problems remain.
    assert run_cli([*common, "--out", str(tmp_path / "o3"), "--resample-to-ref", "--connectivity", "6"]) == 0
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert "f" in summary["cases"] and summary["options"]["connectivity"] == 6


def test_dicom_seg_prediction_against_nrrd_reference(tmp_path: Path) -> None:
    pytest.importorskip("medseg.io.dicom_seg")
    seg = SHARED / "dcmqi-data" / "segmentations" / "liver.dcm"
    nrrd = SHARED / "dcmqi-data" / "segmentations" / "liver_seg.nrrd"
    if not (seg.is_file() and nrrd.is_file()):
        pytest.skip("dcmqi test data not available")
    summary = evaluate_folders(seg, nrrd, out_dir=tmp_path / "r", label_names={1: "liver"}, max_overlays=0, html=False)
    liver = summary["classes"]["liver"]
    assert summary["problems"] == [] and liver["dice"]["mean"] == 1.0 and liver["hd_mm"]["mean"] == 0.0
    assert liver["ref_volume_ml"]["mean"] > 50  # a real liver on three slices


# ------------------------------------------------------------------ real anatomy + HTML
@pytest.fixture(scope="module")
def totalseg_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    ref, pred = TOTALSEG / "example_seg.nii.gz", TOTALSEG / "example_seg_fast.nii.gz"
    image, class_map = TOTALSEG / "example_ct_sm.nii.gz", TOTALSEG / "class_map_total_and_total_mr.json"
    if not all(p.is_file() for p in (ref, pred, image, class_map)):
        pytest.skip(f"TotalSegmentator test files not available in {TOTALSEG}")
    names = {int(k): v for k, v in json.loads(class_map.read_text())["total"].items()}
    out = tmp_path_factory.mktemp("totalseg") / "report"
    summary = evaluate_folders(
        pred, ref, out_dir=out, label_names=names, images=image, regions={"lungs": [10, 11, 12, 13, 14]}
    )
    return out, summary


def test_multiclass_report_on_real_anatomy(totalseg_report: tuple[Path, dict]) -> None:
    out, summary = totalseg_report
    assert summary["problems"] == [] and summary["n_cases"] == 1
    scored = {name: c for name, c in summary["classes"].items() if c["dice"]["n"]}
    assert len(scored) >= 30 and {"liver", "spleen", "aorta", "vertebrae_L1"} <= set(scored)
    # Two TotalSegmentator models agree well on large organs.
    assert scored["liver"]["dice"]["mean"] > 0.95 and scored["spleen"]["dice"]["mean"] > 0.95
    ref = load_volume(TOTALSEG / "example_seg.nii.gz", kind="label").array[0]
    pred = load_volume(TOTALSEG / "example_seg_fast.nii.gz", kind="label").array[0]
    rows = {r["name"]: r for r in read_csv(out / "metrics.csv")}
    for name, value in (("liver", 5), ("pancreas", 7)):
        p, r = pred == value, ref == value
        assert float(rows[name]["dice"]) == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-12)
        expected = surface_metrics(p, r, spacing=(3.0, 3.0, 3.0), tolerance_mm=2.0)
        assert float(rows[name]["hd95_mm"]) == pytest.approx(expected["hd95_mm"], abs=1e-9)
    # a class the fast model misses entirely: Dice 0 and infinite distances, counted, not averaged
    missed = [n for n, c in scored.items() if c["dice"]["mean"] == 0.0]
    assert missed and all(summary["classes"][n]["hd95_mm"]["n_inf"] == 1 for n in missed)
    assert summary["regions"]["lungs"]["dice"]["mean"] > 0.9
    assert [o["case"] for o in summary["overlays"]] == ["example_seg"]
    png = (out / "overlays" / "example_seg.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000  # CT underneath: a large image


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(args: list[str], url: str) -> subprocess.CompletedProcess[str]:
    browser = _chromium()
    assert browser is not None
    with tempfile.TemporaryDirectory() as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            url,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "LANG": "C"})


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(totalseg_report: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = totalseg_report
    page = out / "report.html"
    text = page.read_text()
    assert "<script src" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    assert text.count("data:image/png;base64,") == 2  # plots + one overlay, embedded
    dom = run_chromium(["--dump-dom"], page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert 'data-ready="1"' in dom.stdout  # the sorting script ran to the end
    # The per-case table is sorted by Dice ascending (worst first) after load.
    assert '<th class="asc">Dice</th>' in dom.stdout
    body = dom.stdout.split('<table class="sortable" id="cases"', 1)[1]
    first_row = body.split("<tbody>", 1)[1].split("</tr>", 1)[0]
    worst = min((c for c in summary["classes"].values() if c["dice"]["n"]), key=lambda c: c["dice"]["mean"])
    assert f'data-v="{float(worst["dice"]["mean"])!r}"' in first_row

    # At 1300 px no table needs horizontal scrolling (the page's script measures every table box).
    narrow = run_chromium(["--window-size=1300,2000", "--dump-dom"], page.as_uri())
    assert 'data-overflow=""' in narrow.stdout, narrow.stdout.split("<body", 1)[1][:200]
    shot = tmp_path / "report.png"
    result = run_chromium(["--window-size=1300,2000", f"--screenshot={shot}", "--hide-scrollbars"], page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1300, 2000)
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    # Text, tables and the plot: far from a blank page, and the top band has dark heading text.
    assert pixels.std() > 20 and (pixels < 80).mean() > 0.01
    assert (pixels[:60] < 100).any()
    # The per-structure table's last column ("One side empty") is on screen: its right border is inside.
    table_rows = pixels[300:700]
    assert (table_rows[:, 1240:1290] < 230).any()


def test_overlay_colours_and_worst_cases(totalseg_report: tuple[Path, dict], tmp_path: Path) -> None:
    from PIL import Image

    from medseg.evaluate.api import _worst_cases
    from medseg.evaluate.overlays import PREDICTION_COLOUR, REFERENCE_COLOUR

    out, _ = totalseg_report
    with Image.open(out / "overlays" / "example_seg.png") as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)

    def near(colour: str) -> int:
        target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - target).sum(axis=-1) < 60).sum())

    assert near(REFERENCE_COLOUR) > 200 and near(PREDICTION_COLOUR) > 200  # two colours, not one
    # A perfect case is not a "worst case", even when there are few cases.
    rows = [
        {"case": "perfect", "kind": "class", "dice": 1.0},
        {"case": "perfect", "kind": "class", "dice": float("nan")},
        {"case": "bad", "kind": "class", "dice": 0.5},
        {"case": "bad", "kind": "class", "dice": 1.0},
        {"case": "empty", "kind": "class", "dice": float("nan")},
    ]
    assert _worst_cases(rows, 8) == [("bad", 0.75)]
    preds, refs = tmp_path / "p", tmp_path / "r"
    for case, shift in (("same", 0), ("moved", 2)):
        _pred, ref = labels_pair(3)
        write(refs, f"{case}.nii.gz", ref)
        write(preds, f"{case}.nii.gz", ref if shift == 0 else np.roll(ref, shift, axis=0))
    summary = evaluate_folders(preds, refs, out_dir=tmp_path / "report", label_names=NAMES)
    assert [o["case"] for o in summary["overlays"]] == ["moved"]


# ------------------------------------------------------------------ overlay geometry
def test_overlay_planes_are_radiological_with_true_millimetres() -> None:
    import nibabel as nib

    from medseg.evaluate.overlays import (
        _plane_cut,
        _plane_extent,
        _ras_index,
        _ras_values,
        _screen,
        _screen_point,
        _to_ras,
        error_focus,
    )

    shape, spacing = (12, 10, 8), (0.8, 1.2, 5.0)
    # LPS-identity grid: voxel axis 0 runs towards the patient's left, axis 1 posterior, axis 2 superior.
    geometry = Geometry.from_itk(shape=shape, spacing=spacing, origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    labels = np.zeros(shape, dtype=np.uint8)
    point = (1, 2, 6)  # near the patient's right and anterior, high up
    labels[point] = 1
    ornt = nib.orientations.io_orientation(geometry.affine)
    ras, p = _to_ras(labels, ornt), _ras_index(point, shape, ornt)
    ras_spacing = _ras_values(spacing, ornt)
    assert ras[p] == 1 and ras_spacing == spacing
    for plane in ("axial", "coronal", "sagittal"):
        screen = _screen(ras[_plane_cut(plane, p)], plane)
        rows, cols = np.nonzero(screen)
        x_mm, y_mm = _screen_point(plane, p, ras.shape, ras_spacing)
        left, right, bottom, top = _plane_extent(plane, ras.shape, ras_spacing)
        assert (left, top) == (0.0, 0.0)
        pixel_w, pixel_h = right / screen.shape[1], bottom / screen.shape[0]
        # The cross is drawn on the voxel, and pixels have the voxel's size in mm (true aspect ratio).
        assert int(x_mm // pixel_w) == cols[0] and int(y_mm // pixel_h) == rows[0]
        col_axis, row_axis = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}[plane]
        assert (pixel_w, pixel_h) == pytest.approx((ras_spacing[col_axis], ras_spacing[row_axis]))
        # Patient right and anterior appear on the left, superior at the top.
        if plane in ("axial", "coronal"):
            assert cols[0] < screen.shape[1] / 2  # right of the patient -> left of the screen
        if plane == "axial":
            assert rows[0] < screen.shape[0] / 2  # anterior up
        if plane in ("coronal", "sagittal"):
            assert rows[0] < screen.shape[0] / 2  # superior up
        if plane == "sagittal":
            assert cols[0] < screen.shape[1] / 2  # anterior on the left
    ref = labels.copy()
    ref[point] = 0
    ref[1, 2, 3] = 1
    assert error_focus(labels, ref, values=[1], spacing=spacing) == (1, 2, 6)  # 15 mm both ways: prediction first
