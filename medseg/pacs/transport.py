"""What the DICOMweb and DIMSE clients share: the retry back-off limit and the UID check.

The transports retry different things: DICOMweb each HTTP request, through the ``urllib3.Retry``
mounted on its session (first retry immediate, then ``backoff_s * 2 ** (n - 1)``); DIMSE the
opening of an association, in its own loop (:func:`backoff_delay` before retry ``n``).  Both cap a
wait at :data:`BACKOFF_MAX_S`.  Their timeouts are the profile's, per protocol (HTTP connect/read;
pynetdicom connection/ACSE/DIMSE/network).
"""

from __future__ import annotations

import re

from medseg.pacs.errors import PacsProtocolError

__all__ = ["BACKOFF_MAX_S", "backoff_delay", "check_uid", "is_uid"]

#: Longest wait between two attempts, in seconds.
BACKOFF_MAX_S = 60.0
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def backoff_delay(backoff_s: float, retry: int) -> float:
    """Seconds to wait before retry ``retry`` (1, 2, ...): ``backoff_s * 2 ** (retry - 1)``, at most one minute."""
    return min(BACKOFF_MAX_S, backoff_s * 2 ** (retry - 1))


def is_uid(text: str) -> bool:
    """Whether ``text`` is a valid DICOM UID (digits and dots, at most 64 characters)."""
    return bool(_UID_RE.fullmatch(text)) and len(text) <= 64


def check_uid(value: object, where: str) -> str:
    """``value`` as a UID that is safe in a URL, a query identifier or a file name.

    Raises:
        PacsProtocolError: Not a valid UID; the message starts with ``where``.
    """
    text = str(value or "").strip()
    if not is_uid(text):
        raise PacsProtocolError(f"{where}: invalid UID {text[:80]!r}")
    return text
