"""DICOM pixel data checked, not trusted: header sizes, codestreams and decoded values.

* :func:`check_pixel_header` (discovery, headers only): Rows, Columns, frames, samples and bits are
  plausible; uncompressed pixel data hold exactly ``Rows x Columns x frames x samples x BitsAllocated``
  bits (one padding byte allowed) - more data means the header's image size is wrong (the first bytes
  would silently become the image), less means the file is truncated; the decoded size is below the
  read limit (:mod:`medseg.io.limits`).
* :func:`check_codestream` (before decoding): the first fragment of encapsulated pixel data is the
  codestream its transfer syntax declares (JPEG: SOI and a JPEG SOF marker, JPEG-LS: SOI and SOF55,
  JPEG 2000: SOC+SIZ or a JP2 signature, RLE: a valid segment table).  A JPEG 2000 stream under a JPEG
  baseline UID decodes to garbage with some codecs; here it is an error naming the file.
* :func:`check_decoded` (after decoding): frames have the declared shape, and integer values fit
  BitsStored (a garbled JPEG-LS stream can decode to values the header says cannot exist).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.limits import check_declared_size

__all__ = ["check_codestream", "check_decoded", "check_pixel_header", "declared_pixel_bytes"]

_JPEG = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
}
_JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
_J2K = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}
_RLE = {"1.2.840.10008.1.2.5"}
_FAMILIES = {"JPEG": _JPEG, "JPEG-LS": _JPEG_LS, "JPEG 2000": _J2K, "RLE": _RLE}
_ITEM = b"\xfe\xff\x00\xe0"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOF_JPEG = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_JPEG_LS = {0xF7, 0xF8}


def declared_pixel_bytes(options: dict[str, Any]) -> int:
    """Bytes of uncompressed pixel data the header declares (``Rows x Columns x frames x samples x bits``)."""
    count = int(options["rows"]) * int(options["columns"]) * int(options.get("number_of_frames", 1))
    count *= int(options.get("samples_per_pixel", 1))
    return (count * int(options["bits_allocated"]) + 7) // 8


def check_pixel_header(
    path: Path,
    options: dict[str, Any],
    *,
    value_length: int | None,
    value_offset: int | None,
    encapsulated: bool,
    data: bool = True,
) -> None:
    """Plausible image attributes and, for uncompressed data, the declared size equal to the bytes present.

    Args:
        path: The file.
        options: Decoder options of its :class:`~medseg.io.dicom.PixelLayout`.
        value_length: Length of the PixelData value (``None``: undefined / encapsulated).
        value_offset: Where the value starts in the file.
        encapsulated: Compressed (encapsulated) or deflated pixel data.
        data: Also compare the pixel data length with the header (discovery checks only the header
            and the read limit, so a bad slice stays in its series and loading it names the file).

    Raises:
        InputError: Naming the file and the inconsistent attribute.
    """
    rows, cols = int(options["rows"]), int(options["columns"])
    frames, samples = int(options.get("number_of_frames", 1)), int(options.get("samples_per_pixel", 1))
    allocated, stored = int(options["bits_allocated"]), int(options["bits_stored"])
    if not (1 <= rows <= 65535 and 1 <= cols <= 65535):
        raise InputError(path, f"invalid image size Rows={rows} Columns={cols}")
    if frames < 1:
        raise InputError(path, f"invalid NumberOfFrames {frames}")
    if samples not in (1, 3, 4):
        raise InputError(path, f"invalid SamplesPerPixel {samples}")
    if allocated not in (1, 8, 16, 32, 64):
        raise InputError(path, f"invalid BitsAllocated {allocated}")
    if not 1 <= stored <= allocated:
        raise InputError(path, f"BitsStored {stored} does not fit BitsAllocated {allocated}")
    declared = declared_pixel_bytes(options)
    what = f"the header ({rows}x{cols}, {frames} frame(s), {samples} sample(s), {allocated} bits)"
    size = path.stat().st_size
    if not data or encapsulated or value_length is None or value_offset is None:
        check_declared_size(path, declared, what=what)
        return
    present = min(value_length, max(size - value_offset, 0))
    if present < value_length:
        raise InputError(
            path, f"truncated pixel data: the element declares {value_length} bytes, only {present} are in the file"
        )
    check_declared_size(path, declared, what=what, present=present)
    if value_length > declared + 1:  # (one byte pads odd lengths)
        raise InputError(
            path,
            f"pixel data has {value_length} bytes but {what} accounts for {declared}: Rows/Columns/NumberOfFrames "
            "do not describe the pixel data",
        )


def _first_fragment(path: Path, value_offset: int) -> bytes:
    """The first bytes (up to 64 KiB) of the first fragment of encapsulated pixel data."""
    with path.open("rb") as fh:
        fh.seek(value_offset)
        head = fh.read(8)
        if len(head) < 8 or head[:4] != _ITEM:
            raise InputError(path, "encapsulated pixel data do not start with an item (basic offset table)")
        (table_length,) = struct.unpack("<I", head[4:])
        fh.seek(value_offset + 8 + table_length)
        item = fh.read(8)
        if len(item) < 8 or item[:4] != _ITEM:
            raise InputError(path, "encapsulated pixel data hold no fragment after the basic offset table")
        (length,) = struct.unpack("<I", item[4:])
        return fh.read(min(length, 65536))


def _jpeg_sof(fragment: bytes) -> int | None:
    """The SOF marker of a JPEG / JPEG-LS stream (``None`` if none is found before the scan data)."""
    if fragment[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(fragment):
        if fragment[position] != 0xFF:
            return None
        marker = fragment[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _SOF_JPEG or marker in _SOF_JPEG_LS:
            return marker
        if marker == 0xDA:  # start of scan before any frame header
            return None
        (length,) = struct.unpack(">H", fragment[position + 2 : position + 4])
        position += 2 + length
    return None


def _codestream_kind(fragment: bytes) -> str:
    if fragment[:4] == b"\xff\x4f\xff\x51" or fragment[:12] == _JP2_SIGNATURE:
        return "JPEG 2000"
    sof = _jpeg_sof(fragment)
    if sof in _SOF_JPEG:
        return "JPEG"
    if sof in _SOF_JPEG_LS:
        return "JPEG-LS"
    if len(fragment) >= 64:
        (segments,) = struct.unpack("<I", fragment[:4])
        offsets = struct.unpack("<15I", fragment[4:64])
        if 1 <= segments <= 15 and offsets[0] == 64 and all(o == 0 for o in offsets[segments:]):
            return "RLE"
    return "unknown"


def check_codestream(path: Path, transfer_syntax: str, value_offset: int) -> None:
    """The first fragment is the codestream ``transfer_syntax`` declares.

    Raises:
        InputError: A different codestream (e.g. JPEG 2000 under a JPEG baseline UID) or no recognisable one.
    """
    families = {uid: name for name, uids in _FAMILIES.items() for uid in uids}
    family = families.get(transfer_syntax)
    if family is None:
        return
    kind = _codestream_kind(_first_fragment(path, value_offset))
    if kind != family:
        found = "an unrecognisable stream" if kind == "unknown" else f"a {kind} codestream"
        raise InputError(
            path, f"the transfer syntax {transfer_syntax} declares {family} pixel data, but the data are {found}"
        )


def check_decoded(path: Path, array: np.ndarray, options: dict[str, Any], *, compressed: bool) -> None:
    """Decoded ``(frames, rows, cols)`` data match the header; compressed integer values fit BitsStored.

    Raises:
        InputError: Wrong frame count or shape, or values outside the range BitsStored allows.
    """
    rows, cols = int(options["rows"]), int(options["columns"])
    frames = int(options.get("number_of_frames", 1))
    if array.ndim != 3 or array.shape != (frames, rows, cols):
        raise InputError(
            path, f"decoded pixel data have shape {array.shape}, the header says {frames} frame(s) of {rows}x{cols}"
        )
    if not compressed or array.dtype.kind not in "iu" or array.size == 0:
        return
    bits = int(options["bits_stored"])
    if bits >= array.dtype.itemsize * 8:
        return
    signed = bool(int(options.get("pixel_representation", 0)))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    amin, amax = int(array.min()), int(array.max())
    if amin < lo or amax > hi:
        raise InputError(
            path,
            f"decoded values {amin}..{amax} lie outside the {lo}..{hi} that BitsStored={bits} allows: the "
            "compressed pixel data are corrupt",
        )
