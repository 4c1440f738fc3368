"""PACS integration: DICOMweb (QIDO-RS/WADO-RS/STOW-RS) and DIMSE (C-FIND/C-GET/C-MOVE/C-STORE, listener).

See :mod:`medseg.pacs.run` for the query -> retrieve -> segment -> store pipeline and the listener,
:mod:`medseg.pacs.profile` for server profiles and credentials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from medseg._lazy import lazy_attributes

if TYPE_CHECKING:
    from medseg.pacs.errors import PacsAuthError, PacsConnectionError, PacsError, PacsNotFoundError, PacsProtocolError
    from medseg.pacs.profile import PacsProfile, load_profile, parse_profile
    from medseg.pacs.query import QueryFilters, RemoteSeries, load_filters, parse_filters

__all__ = [
    "PacsAuthError",
    "PacsConnectionError",
    "PacsError",
    "PacsNotFoundError",
    "PacsProfile",
    "PacsProtocolError",
    "QueryFilters",
    "RemoteSeries",
    "load_filters",
    "load_profile",
    "parse_filters",
    "parse_profile",
]

_EXPORTS = {
    **dict.fromkeys(
        ("PacsAuthError", "PacsConnectionError", "PacsError", "PacsNotFoundError", "PacsProtocolError"),
        "medseg.pacs.errors",
    ),
    **dict.fromkeys(("PacsProfile", "load_profile", "parse_profile"), "medseg.pacs.profile"),
    **dict.fromkeys(("QueryFilters", "RemoteSeries", "load_filters", "parse_filters"), "medseg.pacs.query"),
}
# Imported on first use, so that `medseg --help` does not load the PACS clients.
if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name stays an error
    __getattr__ = lazy_attributes(__name__, _EXPORTS)
