"""Broken and hostile inputs built from real files, one case per way an input can lie.

Every case copies a real scan (``../shared/data`` when present, else the repository's generated
``sample_data``) and breaks it one way: truncated, lying headers, oversized declarations, corrupt or
mislabelled compressed pixel data, zero / non-finite spacing, special files, symlink loops, alias
bombs in YAML, tampered model weights, bad files next to good ones, outputs over inputs ...  Each case
says which class of the issue it covers and what must happen: a :class:`~medseg.errors.MedsegError`
subclass whose one-line message names the file and matches a pattern, or a success with a check.

``tests/test_hostile_inputs.py`` runs every case; ``python tests/hostile_inputs.py OUT`` writes the
broken inputs to ``OUT`` (one folder per case) to inspect them or to try them by hand.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SAMPLE = REPO / "sample_data"
PHANTOM = SAMPLE / "Dataset001_CTPhantom"

#: The classes of the issue (``issues show 15``): each case belongs to one.
CLASSES = {
    "readonly": "inputs are read-only",
    "bounded": "sizes bounded before allocating (headers, YAML, plans)",
    "pixels": "pixel data and spacing checked, not trusted",
    "isolation": "one bad file never sinks its neighbours",
    "typed": "typed one-line errors, output locations, labels, weights",
}


@dataclass
class Expect:
    """What a case must do.

    Attributes:
        run: Exercises the broken input (loads it, runs the command ...).
        error: The :class:`MedsegError` subclass expected, or ``None`` when ``run`` must succeed.
        match: Regex the message must match.
        names: A path the message must name (default: the broken file).
        check: Called with ``run``'s result on success (assertions).
        cli: ``run`` returns ``(exit code, stdout, stderr)`` of ``medseg.cli.main``.
    """

    run: Callable[[], Any]
    error: type[BaseException] | None = None
    match: str = ""
    names: Path | str | None = None
    check: Callable[[Any], None] | None = None
    cli: bool = False


@dataclass
class Case:
    name: str
    cls: str
    build: Callable[[Sources, Path], Expect]
    needs: tuple[str, ...] = ()


CASES: list[Case] = []


def case(name: str, cls: str, *needs: str) -> Callable[[Callable[[Sources, Path], Expect]], Callable[..., Expect]]:
    assert cls in CLASSES

    def register(fn: Callable[[Sources, Path], Expect]) -> Callable[..., Expect]:
        CASES.append(Case(name, cls, fn, needs))
        return fn

    return register


# ============================================================================= real sources
@dataclass
class Sources:
    """Real files the cases start from (``None`` where unavailable)."""

    nifti: Path | None = None  # integer CT volume, .nii.gz
    label: Path | None = None  # integer label volume, .nii.gz
    nrrd: Path | None = None  # gzip NRRD image
    dicom_series: Path | None = None  # folder of an uncompressed single-frame series (>= 3 slices)
    dicom_j2k: Path | None = None  # one JPEG 2000 file
    dicom_jpegls: Path | None = None  # one JPEG-LS file
    dicom_rle: Path | None = None  # one RLE file
    rtstruct: Path | None = None  # folder with CT slices and an RTSTRUCT referencing them
    model: Path | None = None  # a trained medseg model folder (from the tests' tiny_model)
    extra: dict[str, Any] = field(default_factory=dict)

    def have(self, needs: tuple[str, ...]) -> list[str]:
        """The names in ``needs`` that are missing."""
        return [n for n in needs if getattr(self, n) is None]


def find_sources(model: Path | None = None) -> Sources:
    """Real files from ``../shared/data`` (preferred) or the generated ``sample_data``."""

    def first(*candidates: Path) -> Path | None:
        return next((c for c in candidates if c.exists()), None)

    series = first(SHARED / "rtstruct-dicomrttool-anon")
    sample_series = SAMPLE / "dicom" / "ct_010"
    j2k_dir = SHARED / "totalseg-tests" / "example_ct_dicom"
    j2k = min(j2k_dir.iterdir()) if j2k_dir.is_dir() else None
    return Sources(
        nifti=first(
            SHARED / "totalseg-tests" / "example_ct_sm.nii.gz",
            SAMPLE / "Dataset001_CTPhantom" / "imagesTr" / "ct_000_0000.nii.gz",
        ),
        label=first(
            SHARED / "totalseg-tests" / "example_seg.nii.gz",
            SAMPLE / "Dataset001_CTPhantom" / "labelsTr" / "ct_000.nii.gz",
        ),
        nrrd=first(SHARED / "pyradiomics-data" / "breast1_image.nrrd"),
        dicom_series=series if series is not None else (sample_series if sample_series.is_dir() else None),
        dicom_j2k=j2k,
        dicom_jpegls=first(SHARED / "dcm_qa_ts" / "In" / "7.dcm"),
        dicom_rle=first(SHARED / "dcm_qa_ts" / "In" / "4.dcm"),
        rtstruct=series,
        model=model,
    )


# ============================================================================= helpers
def nifti_bytes(path: Path) -> bytearray:
    """The uncompressed bytes of a NIfTI-1 file."""
    data = path.read_bytes()
    return bytearray(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)


def set_header(raw: bytearray, **fields: Any) -> bytearray:
    """Overwrite NIfTI-1 header fields (little endian) in place."""
    layout = {
        "dim": (40, "<8h"),
        "datatype": (70, "<h"),
        "bitpix": (72, "<h"),
        "pixdim": (76, "<8f"),
        "vox_offset": (108, "<f"),
        "scl_slope": (112, "<f"),
        "qform_code": (252, "<h"),
        "sform_code": (254, "<h"),
        "srow_x": (280, "<4f"),
        "srow_y": (296, "<4f"),
        "srow_z": (312, "<4f"),
    }
    for key, value in fields.items():
        offset, fmt = layout[key]
        values = value if isinstance(value, list | tuple) else [value]
        struct.pack_into(fmt, raw, offset, *values)
    return raw


def header_field(raw: bytes, key: str) -> tuple[Any, ...]:
    offset, fmt = {"dim": (40, "<8h"), "pixdim": (76, "<8f")}[key]
    return struct.unpack_from(fmt, raw, offset)


def write(path: Path, data: bytes | bytearray, *, gz: bool | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz is None:
        gz = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(bytes(data), compresslevel=1) if gz else bytes(data))
    return path


def copy_series(src: Path, dst: Path) -> list[Path]:
    """The image slices of a series folder (not its RTSTRUCT) copied to ``dst``, sorted."""
    import pydicom

    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(src.iterdir()):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" in ds and str(ds.get("Modality", "")) != "RTSTRUCT":
            out.append(Path(shutil.copy(p, dst / p.name)))
    return out


def edit_dicom(path: Path, edit: Callable[[Any], None], target: Path | None = None) -> Path:
    import pydicom

    ds = pydicom.dcmread(path)
    edit(ds)
    target = target or path
    ds.save_as(target)
    return target


def replace_bytes(path: Path, old: bytes, new: bytes, target: Path) -> Path:
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.replace(old, new, 1))
    return target


def load(path: Path, **kwargs: Any) -> Callable[[], Any]:
    from medseg.io import load_volume

    return lambda: load_volume(path, **kwargs)


def cli(*argv: str | Path) -> Callable[..., tuple[int, str, str]]:
    """Run ``medseg`` in-process; returns ``(exit code, stdout, stderr)``.

    Called with ``debug=True`` the command runs with ``--debug``, so a ``MedsegError`` propagates
    (its type can be checked) instead of being printed.
    """

    def run(debug: bool = False) -> tuple[int, str, str]:
        import contextlib
        import io

        from medseg.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--debug"] * debug + [str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    return run


def _errors() -> Any:
    import medseg.errors as errors

    return errors


# ============================================================================= NIfTI
@case("nifti_gz_cut_in_half", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    data = src.nifti.read_bytes()
    p = write(d / "cut.nii.gz", data[: len(data) // 2], gz=False)
    return Expect(load(p), _errors().InputError, r"truncated|corrupt|cannot read NIfTI")


@case("nifti_raw_truncated", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    p = write(d / "short.nii", raw[: 352 + (len(raw) - 352) // 3])
    expected = len(raw) - 352
    return Expect(load(p), _errors().InputError, rf"truncated: \d+ bytes of voxel data for {expected} declared")


@case("nifti_header_only", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "header.nii", nifti_bytes(src.nifti)[:348])
    return Expect(load(p), _errors().InputError, r"truncated|cannot read NIfTI")


@case("nifti_header_declares_2gib_raw", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti)[:4096], dim=[3, 1024, 1024, 1024, 1, 1, 1, 1])
    p = write(d / "liar.nii", raw)
    return Expect(load(p), _errors().InputError, r"truncated: 3744 bytes of voxel data for 2147483648 declared")


@case("nifti_header_declares_2gib_gz", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti)[:4096], dim=[3, 1024, 1024, 1024, 1, 1, 1, 1])
    p = write(d / "liar.nii.gz", raw)
    return Expect(load(p), _errors().InputError, r"more than .* of compressed data can hold")


@case("nifti_header_declares_30000_cubed", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti), dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    p = write(d / "huge.nii.gz", raw)
    return Expect(load(p), _errors().InputError, r"more than the read limit")


@case("nifti_4d_declares_16gib_uncompressed", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti), dim=[4, 2048, 2048, 1024, 3, 1, 1, 1])
    p = write(d / "huge4d.nii", raw)
    return Expect(load(p), _errors().InputError, r"more than the read limit")


@case("nifti_negative_dim", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    dims = list(header_field(raw, "dim"))
    dims[1] = -dims[1]
    p = write(d / "negdim.nii", set_header(raw, dim=dims))
    return Expect(load(p), _errors().InputError, r"zero or negative dimension|cannot read NIfTI header")


@case("nifti_zero_dim", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    dims = list(header_field(raw, "dim"))
    dims[3] = 0
    p = write(d / "zerodim.nii.gz", set_header(raw, dim=dims))
    return Expect(load(p), _errors().InputError, r"zero or negative dimension")


@case("nifti_bad_dim0", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    dims = list(header_field(raw, "dim"))
    dims[0] = 9
    p = write(d / "dim0.nii", set_header(raw, dim=dims))
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI header")


@case("nifti_unknown_datatype", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "dtype.nii.gz", set_header(nifti_bytes(src.nifti), datatype=255))
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI header .*data ?type|cannot read NIfTI header")


@case("nifti_complex_voxels", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    img = nib.load(src.nifti)
    data = np.asarray(img.dataobj)[:16, :16, :8].astype(np.complex64)
    p = d / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), p)
    return Expect(load(p), _errors().InputError, r"unsupported voxel type complex64")


@case("nifti_vox_offset_beyond_file", "bounded", "nifti")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "offset.nii", set_header(nifti_bytes(src.nifti), vox_offset=1.0e9))
    return Expect(load(p), _errors().InputError, r"truncated|cannot read NIfTI")


@case("nifti_zero_pixdim", "pixels", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    pix = list(header_field(raw, "pixdim"))
    pix[2] = 0.0
    p = write(d / "zeropix.nii.gz", set_header(raw, pixdim=pix, sform_code=0, qform_code=1))
    return Expect(load(p), _errors().InputError, r"voxel size \(pixdim\) .* is not positive and finite")


@case("nifti_nan_pixdim_no_orientation", "pixels", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = nifti_bytes(src.nifti)
    pix = list(header_field(raw, "pixdim"))
    pix[1] = float("nan")
    p = write(d / "nanpix.nii", set_header(raw, pixdim=pix, sform_code=0, qform_code=0))
    return Expect(load(p), _errors().InputError, r"pixdim.*not positive and finite")


@case("nifti_singular_sform", "pixels", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti), sform_code=1, srow_x=[0, 0, 0, 1], srow_y=[0, 0, 0, 2])
    p = write(d / "singular.nii.gz", raw)
    return Expect(load(p), _errors().InputError, r"invalid geometry in the header: .*singular")


@case("nifti_infinite_sform", "pixels", "nifti")
def _(src: Sources, d: Path) -> Expect:
    raw = set_header(nifti_bytes(src.nifti), sform_code=1, srow_z=[0, 0, float("inf"), 0])
    p = write(d / "inf.nii", raw)
    return Expect(load(p), _errors().InputError, r"invalid geometry in the header: .*finite")


@case("nifti_nan_voxels", "pixels", "nifti")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    img = nib.load(src.nifti)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[1, 2, 3] = np.nan
    p = d / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), p)
    return Expect(load(p), _errors().InputError, r"NaN or infinite")


@case("nifti_gz_corrupt_deflate", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    data = bytearray(src.nifti.read_bytes())
    for k in range(len(data) // 3, len(data) // 3 + 64):
        data[k] ^= 0x5A
    p = write(d / "garbled.nii.gz", data, gz=False)
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI|corrupt|truncated")


@case("nifti_raw_bytes_under_gz_suffix", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "notgz.nii.gz", nifti_bytes(src.nifti), gz=False)
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI")


@case("nifti_empty_file", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "empty.nii.gz", b"", gz=False)
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI|holds 0 bytes, less than a 348-byte NIfTI header")


@case("nifti_random_bytes", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    size = len(nifti_bytes(src.nifti))
    p = write(d / "random.nii", np.random.default_rng(15).integers(0, 256, size, dtype=np.uint8).tobytes())
    return Expect(load(p), _errors().InputError, r"cannot read NIfTI|truncated|zero or negative|read limit|pixdim")


@case("fifo_named_like_a_volume", "typed")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "pipe.nii.gz"
    os.mkfifo(p)
    return Expect(load(p), _errors().InputError, r"not a regular file \(a FIFO\)")


@case("dev_zero_named_like_a_volume", "typed")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "zero.nii"
    p.symlink_to("/dev/zero")
    return Expect(load(p), _errors().InputError, r"not a regular file \(a character device\)")


@case("symlink_loop", "typed")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.nii.gz").symlink_to(d / "b.nii.gz")
    (d / "b.nii.gz").symlink_to(d / "a.nii.gz")
    return Expect(load(d / "a.nii.gz"), _errors().InputError, r"symbolic links|cannot access")


@case("folder_named_like_a_volume", "typed")
def _(src: Sources, d: Path) -> Expect:
    p = d / "folder.nii.gz"
    p.mkdir(parents=True)
    return Expect(load(p), _errors().InputError, r"no DICOM image series found")


# ============================================================================= labels
@case("label_value_1e30", "typed", "label")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    img = nib.load(src.label)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = 1e30
    p = d / "huge_label.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), p)
    return Expect(load(p, kind="label"), _errors().InputError, r"label value 1e\+30 is outside the label range")


@case("label_value_nan", "typed", "label")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    img = nib.load(src.label)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[2, 2, 2] = np.nan
    p = d / "nan_label.nii"
    nib.save(nib.Nifti1Image(data, img.affine), p)
    return Expect(load(p, kind="label"), _errors().InputError, r"NaN or infinite")


@case("label_fractional", "typed", "label")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    img = nib.load(src.label)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[1, 1, 1] = 0.5
    p = d / "frac.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), p)
    return Expect(load(p, kind="label"), _errors().InputError, r"non-integer values")


@case("evaluate_prediction_with_1e30", "typed", "label")
def _(src: Sources, d: Path) -> Expect:
    import nibabel as nib

    from medseg.evaluate import evaluate_folders

    img = nib.load(src.label)
    ref, pred = d / "ref", d / "pred"
    ref.mkdir(parents=True)
    pred.mkdir()
    shutil.copy(src.label, ref / "case.nii.gz")
    data = np.asarray(img.dataobj).astype(np.float64)
    data[data > 0] = 1e30
    nib.save(nib.Nifti1Image(data, img.affine), pred / "case.nii.gz")

    def check(summary: dict[str, Any]) -> None:
        problems = [p["message"] for p in summary["problems"]]
        assert summary["n_cases"] == 0, summary
        assert any("outside the label range" in m and "case.nii.gz" in m for m in problems), problems

    return Expect(lambda: evaluate_folders(pred, ref, out_dir=d / "report", html=False, max_overlays=0), check=check)


# ============================================================================= NRRD / MHA
def _raw_itk(src: Path, target: Path) -> Path:
    import SimpleITK as sitk

    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(str(src)), str(target), useCompression=False)
    return target


def _split_header(path: Path) -> tuple[bytes, bytes]:
    data = path.read_bytes()
    if path.suffix == ".nrrd":
        end = data.index(b"\n\n") + 2
    else:
        end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    return data[:end], data[end:]


@case("nrrd_truncated", "bounded", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "raw.nrrd")
    head, body = _split_header(p)
    p.write_bytes(head + body[: len(body) // 4])
    return Expect(load(p), _errors().InputError, rf"truncated: {len(body) // 4} bytes of voxel data for {len(body)}")


@case("nrrd_sizes_lie", "bounded", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "liar.nrrd")
    head, body = _split_header(p)
    sizes = next(line for line in head.decode().splitlines() if line.startswith("sizes:"))
    p.write_bytes(head.replace(sizes.encode(), b"sizes: 4000 4000 4000") + body)
    return Expect(load(p), _errors().InputError, r"truncated: \d+ bytes of voxel data for 128000000000|read limit")


@case("nrrd_gzip_declares_too_much", "bounded", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    head, body = _split_header(src.nrrd)
    sizes = next(line for line in head.decode().splitlines() if line.startswith("sizes:"))
    p = write(d / "liar_gz.nrrd", head.replace(sizes.encode(), b"sizes: 1000 1000 1000") + body, gz=False)
    return Expect(load(p), _errors().InputError, r"compressed data can hold")


@case("nrrd_zero_spacing", "pixels", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    head, body = _split_header(src.nrrd)
    line = next(x for x in head.decode().splitlines() if x.startswith("space directions:"))
    p = write(
        d / "zero.nrrd", head.replace(line.encode(), b"space directions: (0,0,0) (0,1,0) (0,0,2)") + body, gz=False
    )
    return Expect(load(p), _errors().InputError, r"spacing .* is not positive and finite|cannot read image")


@case("nrrd_garbage_header", "typed", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    _, body = _split_header(src.nrrd)
    p = write(d / "garbage.nrrd", b"NRRD0004\ntype: quux\ndimension: -3\n\n" + body, gz=False)
    return Expect(load(p), _errors().InputError, r"cannot read image")


@case("mha_truncated", "bounded", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "short.mha")
    head, body = _split_header(p)
    p.write_bytes(head + body[:100])
    return Expect(load(p), _errors().InputError, rf"truncated: 100 bytes of voxel data for {len(body)}")


@case("mha_dimsize_lie", "bounded", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "liar.mha")
    head, body = _split_header(p)
    line = next(x for x in head.decode().splitlines() if x.startswith("DimSize"))
    p.write_bytes(head.replace(line.encode(), b"DimSize = 65535 65535 65535") + body)
    return Expect(load(p), _errors().InputError, r"read limit")


@case("mha_zero_spacing", "pixels", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "zero.mha")
    head, body = _split_header(p)
    line = next(x for x in head.decode().splitlines() if x.startswith("ElementSpacing"))
    p.write_bytes(head.replace(line.encode(), b"ElementSpacing = 0.66 0 2.1") + body)
    return Expect(load(p), _errors().InputError, r"spacing \(0\.66, 0\.0, 2\.1\) is not positive and finite")


@case("mhd_missing_data_file", "typed", "nrrd")
def _(src: Sources, d: Path) -> Expect:
    p = _raw_itk(src.nrrd, d / "detached.mha")
    head, _ = _split_header(p)
    mhd = d / "detached.mhd"
    mhd.write_bytes(head.replace(b"ElementDataFile = LOCAL", b"ElementDataFile = gone.raw"))
    return Expect(load(mhd), _errors().InputError, r"its data file gone.raw .* does not exist")


# ============================================================================= DICOM
def _series(src: Sources, d: Path) -> list[Path]:
    return copy_series(src.dicom_series, d / "series")


@case("dicom_slice_truncated", "bounded", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 1000])
    from medseg.io import read_dicom_series

    return Expect(
        lambda: read_dicom_series(d / "series"),
        _errors().InputError,
        r"truncated pixel data: the element declares \d+ bytes, only \d+ are in the file",
        names=files[1],
    )


@case("dicom_rows_smaller_than_pixel_data", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def halve(ds: Any) -> None:
        ds.Rows = int(ds.Rows) // 2

    edit_dicom(files[0], halve)
    return Expect(load(files[0]), _errors().InputError, r"Rows/Columns/NumberOfFrames do not describe the pixel data")


@case("dicom_columns_off_by_one", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def shrink(ds: Any) -> None:
        ds.Columns = int(ds.Columns) - 1

    edit_dicom(files[0], shrink)
    return Expect(load(files[0]), _errors().InputError, r"do not describe the pixel data")


@case("dicom_rows_columns_65535", "bounded", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def grow(ds: Any) -> None:
        ds.Rows = ds.Columns = 65535

    edit_dicom(files[0], grow)
    return Expect(load(files[0]), _errors().InputError, r"truncated: \d+ bytes of voxel data for 8589672450 declared")


@case("dicom_number_of_frames_100000", "bounded", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def frames(ds: Any) -> None:
        ds.NumberOfFrames = 100000

    edit_dicom(files[0], frames)
    return Expect(load(files[0]), _errors().InputError, r"read limit|truncated")


@case("dicom_bits_allocated_12", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def bits(ds: Any) -> None:
        ds.BitsAllocated = 12

    edit_dicom(files[0], bits)
    return Expect(load(files[0]), _errors().InputError, r"invalid BitsAllocated 12")


@case("dicom_bits_stored_above_allocated", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def bits(ds: Any) -> None:
        ds.BitsStored = 20

    edit_dicom(files[0], bits)
    return Expect(load(files[0]), _errors().InputError, r"BitsStored 20 does not fit BitsAllocated 16")


@case("dicom_j2k_under_jpeg_baseline_uid", "pixels", "dicom_j2k")
def _(src: Sources, d: Path) -> Expect:
    p = replace_bytes(src.dicom_j2k, b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.50", d / "mislabelled.dcm")
    return Expect(load(p), _errors().InputError, r"declares JPEG pixel data, but the data are a JPEG 2000 codestream")


@case("dicom_jpegls_under_j2k_uid", "pixels", "dicom_jpegls")
def _(src: Sources, d: Path) -> Expect:
    p = replace_bytes(src.dicom_jpegls, b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.4.90", d / "mislabelled.dcm")
    return Expect(
        load(p), _errors().InputError, r"declares JPEG 2000 pixel data, but the data are a JPEG-LS codestream"
    )


@case("dicom_rle_under_jpegls_uid", "pixels", "dicom_rle")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    p = Path(shutil.copy(src.dicom_rle, d / "mislabelled.dcm"))

    def jpeg_ls(ds: Any) -> None:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"

    edit_dicom(p, jpeg_ls)
    return Expect(load(p), _errors().InputError, r"declares JPEG-LS pixel data, but the data are a RLE codestream")


@case("dicom_jpegls_garbled_stream", "pixels", "dicom_jpegls")
def _(src: Sources, d: Path) -> Expect:
    data = bytearray(src.dicom_jpegls.read_bytes())
    start = len(data) // 2
    rng = np.random.default_rng(7)
    data[start : start + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    p = write(d / "garbled.dcm", data, gz=False)
    return Expect(load(p), _errors().InputError, r"cannot decode pixel data|outside the .* BitsStored|corrupt")


@case("dicom_jpegls_values_beyond_bits_stored", "pixels", "dicom_jpegls")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    p = Path(shutil.copy(src.dicom_jpegls, d / "bits.dcm"))

    def fewer_bits(ds: Any) -> None:
        ds.BitsStored = 4
        ds.HighBit = 3

    edit_dicom(p, fewer_bits)
    return Expect(load(p), _errors().InputError, r"decoded values \d+\.\.\d+ lie outside the 0\.\.15")


@case("dicom_zero_pixel_spacing", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def zero(ds: Any) -> None:
        ds.PixelSpacing = [0, 0.5]

    for f in files:
        edit_dicom(f, zero)
    return Expect(load(d / "series"), _errors().InputError, r"PixelSpacing \(0\.0, 0\.5\) is not positive")


@case("dicom_nan_position", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def nan(ds: Any) -> None:
        ds.ImagePositionPatient = ["NaN", "0", "0"]

    edit_dicom(files[0], nan)
    return Expect(load(d / "series"), _errors().InputError, r"missing or invalid ImagePositionPatient", names=files[0])


@case("dicom_degenerate_orientation", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def flat(ds: Any) -> None:
        ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]

    for f in files:
        edit_dicom(f, flat)
    return Expect(load(d / "series"), _errors().InputError, r"is not two orthogonal unit vectors")


@case("dicom_single_slice_zero_thickness", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)

    def thin(ds: Any) -> None:
        ds.SliceThickness = 0

    edit_dicom(files[0], thin)
    return Expect(load(files[0]), _errors().InputError, r"single slice without a positive SliceThickness")


@case("dicom_duplicate_position_other_pixels", "pixels", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    import pydicom

    position = pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient

    def same(ds: Any) -> None:
        ds.ImagePositionPatient = position

    edit_dicom(files[1], same)
    return Expect(load(d / "series"), _errors().InputError, r"duplicate slice position .* with different pixels")


# ------------------------------------------------------------------ one bad file beside good ones
def _bad_dicom_headers(folder: Path, good: Path) -> dict[str, Path]:
    """Files that break pydicom's header parsing in different ways, next to a good series."""
    data = good.read_bytes()
    bad: dict[str, Path] = {}
    # an element with a length running far past the end of the file (BytesLengthException / EOF)
    position = data.index(b"\x28\x00\x10\x00")  # (0028,0010) Rows
    broken = bytearray(data)
    broken[position + 4 : position + 8] = struct.pack("<I", 3)  # US value with an odd length
    bad["odd_length_us"] = write(folder / "zz_odd_length.dcm", broken, gz=False)
    # an explicit-VR file with an unknown VR (pydicom: NotImplementedError in some paths)
    import pydicom

    ds = pydicom.dcmread(good)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = folder / "zz_unknown_vr.dcm"
    ds.save_as(path, enforce_file_format=True)
    raw = bytearray(path.read_bytes())
    where = raw.index(b"\x28\x00\x10\x00US")
    raw[where + 4 : where + 6] = b"QQ"
    bad["unknown_vr"] = write(path, raw, gz=False)
    # DICM magic followed by noise
    noise = np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    bad["noise"] = write(folder / "zz_noise.dcm", b"\0" * 128 + b"DICM" + noise, gz=False)
    # a FIFO (must never be opened: reading it would block)
    os.mkfifo(folder / "zz_pipe")
    bad["fifo"] = folder / "zz_pipe"
    return bad


@case("dicom_bad_files_beside_a_good_series_scan", "isolation", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    bad = _bad_dicom_headers(d / "series", files[0])
    from medseg.io import load_volume, scan_dicom

    def run() -> Any:
        scan = scan_dicom(d / "series")
        return scan, load_volume(d / "series")

    def check(result: Any) -> None:
        scan, volume = result
        assert len(scan.series) == 1 and len(scan.series[0].files) == len(files), scan.series
        reasons = {p.name: r for p, r in scan.skipped}
        for path in bad.values():
            assert path.name in reasons, (path, reasons)
        assert reasons["zz_pipe"] == "not a regular file"
        assert volume.geometry.shape[2] == len(files)

    return Expect(run, check=check)


@case("dicom_bad_files_beside_a_good_series_info_cli", "isolation", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    _bad_dicom_headers(d / "series", files[0])

    def check(result: tuple[int, str, str]) -> None:
        code, out, err = result
        assert code == 0, err
        assert "1 DICOM series" in out and "skipped 4 file(s)" in out, out

    return Expect(cli("info", d / "series"), check=check)


@case("dicom_bad_files_beside_a_good_series_convert", "isolation", "dicom_series")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    _bad_dicom_headers(d / "series", files[0])

    def check(result: tuple[int, str, str]) -> None:
        code, out, err = result
        assert code == 0, err
        assert len(list((d / "out").rglob("*.nii.gz"))) == 1, out

    return Expect(cli("convert", d / "series", d / "out"), check=check)


@case("dicom_bad_files_beside_a_good_series_batch", "isolation", "dicom_series", "model")
def _(src: Sources, d: Path) -> Expect:
    files = _series(src, d)
    bad = _bad_dicom_headers(d / "series", files[0])

    def check(result: tuple[int, str, str]) -> None:
        code, _, err = result
        assert code == 0, err
        import sqlite3

        from medseg.batch.manifest import Manifest

        with Manifest(d / "out" / "manifest.sqlite") as manifest:
            rows = manifest.rows()
        with sqlite3.connect(d / "out" / "manifest.sqlite") as db:
            ignored = {Path(p).name for (p,) in db.execute("SELECT path FROM ignored")}
        assert [r["state"] for r in rows] == ["pending"], rows
        assert {bad["fifo"].name, bad["noise"].name, bad["unknown_vr"].name} <= ignored, ignored

    return Expect(
        cli("batch", d / "series", "--model", src.model, "--out", d / "out", "--discover-only", "--quiet"), check=check
    )


@case("nifti_folder_one_bad_case_convert", "isolation", "nifti")
def _(src: Sources, d: Path) -> Expect:
    folder = d / "in"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(src.nifti, folder / "good.nii.gz")
    write(folder / "bad.nii.gz", set_header(nifti_bytes(src.nifti), datatype=255))

    def check(result: tuple[int, str, str]) -> None:
        code, out, err = result
        assert code == 1 and (d / "out" / "good.nii.gz").is_file(), (out, err)
        assert "bad.nii.gz" in err and "cannot read NIfTI header" in err, err
        assert "1 converted" in out and "1 failed" in out, out

    return Expect(cli("convert", folder, d / "out"), check=check)


@case("nifti_folder_one_bad_case_predict", "isolation", "nifti", "model")
def _(src: Sources, d: Path) -> Expect:
    folder = d / "in"
    folder.mkdir(parents=True, exist_ok=True)
    good = SAMPLE / "Dataset001_CTPhantom" / "imagesTs" / "ct_010_0000.nii.gz"
    shutil.copy(good if good.exists() else src.nifti, folder / "good.nii.gz")
    write(folder / "bad.nii.gz", set_header(nifti_bytes(src.nifti), datatype=255))

    def check(result: tuple[int, str, str]) -> None:
        code, out, err = result
        assert code == 1 and (d / "out" / "good.nii.gz").is_file(), (out, err)
        assert "bad: FAILED" in err and "bad.nii.gz" in err, err
        assert not (d / "out" / "bad.nii.gz").exists()

    return Expect(cli("predict", "--model", src.model, "--out", d / "out", "--quiet", folder), check=check)


@case("duplicate_case_names_from_two_folders", "isolation", "nifti")
def _(src: Sources, d: Path) -> Expect:
    for sub in ("a", "b"):
        (d / sub).mkdir(parents=True)
        shutil.copy(src.nifti, d / sub / "case.nii.gz")
    from medseg.infer.run import group_inputs

    return Expect(
        lambda: group_inputs([d / "a", d / "b"], num_channels=1),
        _errors().InputError,
        rf"case 'case' \(channel 0\) is also given as {d / 'a' / 'case.nii.gz'}",
        names=d / "b" / "case.nii.gz",
    )


@case("rtstruct_referencing_another_series", "typed", "rtstruct", "dicom_j2k")
def _(src: Sources, d: Path) -> Expect:
    files = copy_series(src.rtstruct, d / "ct")
    rs = next(p for p in src.rtstruct.iterdir() if p.name.startswith("RS"))
    rt = Path(shutil.copy(rs, d / "rs.dcm"))
    import pydicom

    def other_series(ds: Any) -> None:
        for frame in ds.ReferencedFrameOfReferenceSequence:
            for study in frame.RTReferencedStudySequence:
                for series in study.RTReferencedSeriesSequence:
                    series.SeriesInstanceUID = "1.2.3.4.5.6.7.8.9"

    edit_dicom(rt, other_series)
    del pydicom, files
    from medseg.io.rtstruct import rtstruct_to_labels

    return Expect(
        lambda: rtstruct_to_labels(rt, d / "ct"),
        _errors().InputError,
        r"the RTSTRUCT references series 1\.2\.3\.4\.5\.6\.7\.8\.9, but .* holds series",
    )


# ============================================================================= YAML, configs, plans
_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9)
)


def _model_copy(src: Sources, d: Path) -> Path:
    return Path(shutil.copytree(src.model, d / "model"))


@case("config_yaml_billion_laughs", "bounded", "model")
def _(src: Sources, d: Path) -> Expect:
    model = _model_copy(src, d)
    (model / "config.yaml").write_text(_BOMB)
    from medseg.models.package import load_model

    return Expect(
        lambda: load_model(model), _errors().ModelError, r"expands to more than \d+ nodes", names=model / "config.yaml"
    )


@case("config_yaml_recursive_alias", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "config.yaml", b"train: &t {iterations: *t}\n", gz=False)
    from medseg.config import load_config

    return Expect(lambda: load_config(p), _errors().ConfigError, r"recursive YAML alias")


@case("config_yaml_deep_nesting", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "deep.yaml", ("x: " + "[" * 5000 + "]" * 5000 + "\n").encode(), gz=False)
    from medseg.config import load_config

    return Expect(lambda: load_config(p), _errors().ConfigError, r"nested deeper than|nested too deeply")


@case("config_binary_file", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    d.mkdir(parents=True, exist_ok=True)
    p = Path(shutil.copy(src.nifti, d / "config.yaml"))
    return Expect(cli("demo", "--config", p, "--out", d / "out"), _errors().ConfigError, r"not a text file", cli=True)


@case("config_too_large", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "big.yaml", b"# " + b"x" * (9 * 1024 * 1024) + b"\nseed: 1\n", gz=False)
    from medseg.config import load_config

    return Expect(lambda: load_config(p), _errors().ConfigError, r"too large for a YAML file")


@case("batch_rules_bomb", "bounded", "dicom_series", "model")
def _(src: Sources, d: Path) -> Expect:
    _series(src, d)
    rules = write(d / "rules.yaml", _BOMB.encode(), gz=False)
    return Expect(
        cli("batch", d / "series", "--model", src.model, "--out", d / "out", "--rules", rules, "--discover-only"),
        _errors().ConfigError,
        r"expands to more than",
        names=rules,
        cli=True,
    )


@case("pacs_profile_bomb", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "profile.yaml", _BOMB.encode(), gz=False)
    from medseg.pacs.profile import load_profile

    return Expect(lambda: load_profile(p), _errors().ConfigError, r"expands to more than")


@case("evaluate_regions_bomb", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "regions.yaml", _BOMB.encode(), gz=False)
    from medseg.evaluate.inputs import load_regions

    return Expect(lambda: load_regions(p), _errors().ConfigError, r"expands to more than")


@case("dataset_yaml_bomb", "bounded")
def _(src: Sources, d: Path) -> Expect:
    p = write(d / "dataset.yaml", _BOMB.encode(), gz=False)
    from medseg.data.datasets import load_dataset

    return Expect(lambda: load_dataset(p), _errors().ConfigError, r"expands to more than")


@case("plan_100000_channels", "bounded", "model")
def _(src: Sources, d: Path) -> Expect:
    from medseg.io.safe_yaml import load_yaml_file

    model = _model_copy(src, d)
    plan = load_yaml_file(model / "plan.yaml")
    plan["network"]["channels"] = [100000] * len(plan["network"]["channels"])
    import yaml

    (model / "plan.yaml").write_text(yaml.safe_dump(plan))
    from medseg.models.package import load_model

    return Expect(
        lambda: load_model(model), _errors().ModelError, r"network.channels: .*features", names=model / "plan.yaml"
    )


@case("plan_huge_patch", "bounded", "model")
def _(src: Sources, d: Path) -> Expect:
    from medseg.io.safe_yaml import load_yaml_file

    model = _model_copy(src, d)
    plan = load_yaml_file(model / "plan.yaml")
    plan["patch_size"] = [65536, 65536, 65536]
    import yaml

    (model / "plan.yaml").write_text(yaml.safe_dump(plan))
    from medseg.models.package import load_model

    return Expect(
        lambda: load_model(model), _errors().ModelError, r"patch_size at most 1024", names=model / "plan.yaml"
    )


# ============================================================================= weights
def _weights_case(src: Sources, d: Path, content: bytes | Callable[[Path], None], match: str) -> Expect:
    model = _model_copy(src, d)
    weights = model / "weights.pt"
    if callable(content):
        content(weights)
    else:
        weights.write_bytes(content)
    from medseg.models.package import load_model

    def run() -> Any:
        return load_model(model)

    return Expect(run, _errors().ModelError, match, names=weights)


@case("weights_empty_file", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    return _weights_case(src, d, b"", r"not a medseg weights file \(not a PyTorch zip archive\)")


@case("weights_text_file", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    return _weights_case(src, d, b"these are not the weights you are looking for\n", r"not a medseg weights file")


@case("weights_truncated_archive", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    data = (src.model / "weights.pt").read_bytes()
    return _weights_case(src, d, data[: len(data) // 2], r"not a medseg weights file")


class _Payload:
    marker = ""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@case("weights_pickle_payload", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    marker = d / "PAYLOAD_RAN"

    def tamper(path: Path) -> None:
        import torch

        payload = _Payload()
        payload.marker = str(marker)
        state = torch.load(src.model / "weights.pt", weights_only=True)
        state["evil"] = payload
        torch.save(state, path)

    expect = _weights_case(src, d, tamper, r"not a medseg weights file \(it holds objects other than tensors")
    run = expect.run

    def guarded() -> Any:
        try:
            return run()
        finally:
            assert not marker.exists(), "the pickle payload ran"

    expect.run = guarded
    return expect


@case("weights_plain_dict", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    import torch

    return _weights_case(src, d, lambda p: torch.save({"a": 1}, p), r"expected a state dict of named tensors")


@case("weights_wrong_shapes", "typed", "model")
def _(src: Sources, d: Path) -> Expect:
    import torch

    def shrink(path: Path) -> None:
        state = torch.load(src.model / "weights.pt", weights_only=True)
        key = next(k for k, v in state.items() if v.ndim > 1)
        state[key] = state[key][:1]
        torch.save(state, path)

    return _weights_case(src, d, shrink, r"cannot load weights \(Error\(s\) in loading state_dict")


# ============================================================================= outputs (checked before work)
@case("predict_out_under_a_regular_file", "typed", "nifti", "model")
def _(src: Sources, d: Path) -> Expect:
    blocker = write(d / "blocker", b"x", gz=False)
    return Expect(
        cli("predict", "--model", src.model, "--out", blocker / "out", src.nifti),
        _errors().OutputPathError,
        r"cannot create the output folder: .*blocker is a file, not a folder",
        names=blocker / "out",
        cli=True,
    )


@case("evaluate_out_is_a_file", "typed", "label")
def _(src: Sources, d: Path) -> Expect:
    blocker = write(d / "report.txt", b"x", gz=False)
    return Expect(
        cli("evaluate", "--pred", src.label, "--ref", src.label, "--out", blocker),
        _errors().OutputPathError,
        r"report folder exists and is not a folder",
        names=blocker,
        cli=True,
    )


@case("convert_out_is_a_file", "typed", "nifti")
def _(src: Sources, d: Path) -> Expect:
    blocker = write(d / "out", b"x", gz=False)
    return Expect(
        cli("convert", src.nifti, blocker),
        _errors().OutputPathError,
        r"exists and is not a folder",
        names=blocker,
        cli=True,
    )


@case("predict_output_over_its_input", "readonly", "nifti")
def _(src: Sources, d: Path) -> Expect:
    folder = d / "in"
    folder.mkdir(parents=True, exist_ok=True)
    case_file = Path(shutil.copy(src.nifti, folder / "case.nii.gz"))
    before = case_file.read_bytes()

    def run(debug: bool = False) -> tuple[int, str, str]:
        try:
            return cli("predict", "--model", d / "m", "--out", folder, "--overwrite", case_file)(debug)
        finally:
            assert case_file.read_bytes() == before and sorted(folder.iterdir()) == [case_file]

    return Expect(run, _errors().OutputPathError, r"output folder contains the input file", names=folder, cli=True)


@case("convert_into_its_input_with_overwrite", "readonly", "nifti")
def _(src: Sources, d: Path) -> Expect:
    folder = d / "in"
    folder.mkdir(parents=True, exist_ok=True)
    case_file = Path(shutil.copy(src.nifti, folder / "case.nii.gz"))
    before = case_file.read_bytes()

    def run(debug: bool = False) -> tuple[int, str, str]:
        try:
            return cli("convert", case_file, folder, "--overwrite")(debug)
        finally:
            assert case_file.read_bytes() == before and sorted(folder.iterdir()) == [case_file]

    return Expect(run, _errors().OutputPathError, r"output (folder )?contains the input file", names=folder, cli=True)


# ============================================================================= script
def build_all(out: Path, sources: Sources) -> list[tuple[str, str, str]]:
    """Build every case whose sources exist under ``out/<case>``; returns ``(case, class, status)``."""
    rows = []
    for item in CASES:
        missing = sources.have(item.needs)
        if missing:
            rows.append((item.name, item.cls, f"skipped (no {', '.join(missing)})"))
            continue
        (out / item.name).mkdir(parents=True, exist_ok=True)
        item.build(sources, out / item.name)
        rows.append((item.name, item.cls, "built"))
    return rows


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile_inputs")
    model_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    for name, cls, status in build_all(target, find_sources(model_dir)):
        print(f"{name:<50} {cls:<10} {status}")
    print(json.dumps({c: sum(1 for x in CASES if x.cls == c) for c in CLASSES}))
