"""Errors of the PACS layer: every one names the server (profile name and address) and the reason.

Messages never contain credentials: URLs are shown without user info and query strings, and
HTTP error bodies are not echoed (servers sometimes reflect request headers in them).
"""

from __future__ import annotations

from medseg.errors import MedsegError

__all__ = [
    "PacsAuthError",
    "PacsConnectionError",
    "PacsError",
    "PacsNotFoundError",
    "PacsProtocolError",
]


class PacsError(MedsegError):
    """A PACS operation failed; the message names the server and the reason."""


class PacsConnectionError(PacsError):
    """The server could not be reached (refused, timed out, TLS failure) after the retries."""


class PacsAuthError(PacsError):
    """The server refused the credentials (HTTP 401/403, DIMSE association rejected)."""


class PacsNotFoundError(PacsError):
    """The requested study/series/instance is not (or no longer) on the server."""


class PacsProtocolError(PacsError):
    """The server answered with something medseg cannot use (bad status, malformed instance, ...)."""
