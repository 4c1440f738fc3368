"""PACS integration: DICOMweb (QIDO-RS/WADO-RS/STOW-RS) and DIMSE (C-FIND/C-GET/C-MOVE/C-STORE, listener).

See :mod:`medseg.pacs.run` for the query -> retrieve -> segment -> store pipeline and the listener,
:mod:`medseg.pacs.profile` for server profiles and credentials.
"""

from __future__ import annotations

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
