"""DICOMweb client side: QIDO-RS queries, WADO-RS series retrieval, STOW-RS upload.

Built on `dicomweb-client <https://github.com/ImagingDataCommons/dicomweb-client>`_ (WADO-RS
multipart decoding, STOW-RS multipart encoding) over one ``requests`` session that carries:

* authentication (none, HTTP basic, bearer token) from the profile - secrets are read from an
  environment variable or a file, never from the command line, and never logged;
* TLS verification (on by default; a CA bundle path; optional client certificate);
* connect/read timeouts and retries with exponential backoff on connection errors and on
  HTTP 429/500/502/503/504 (``urllib3.Retry`` mounted on the session; dicomweb-client's own
  retry loop, which only retries status codes and sleeps seconds, is switched off).  STOW-RS
  bodies are always sent unchunked so a retried POST resends the whole body; storing an
  instance twice is harmless because servers key instances by SOPInstanceUID.

QIDO-RS requests are built here rather than by dicomweb-client: it percent-encodes ``*`` and
``?``, which Orthanc 1.10's DICOMweb plugin does not decode, so wildcard queries silently match
nothing there; see :mod:`medseg.pacs.query` for how values are sent and verified locally.

Retrieval writes each instance of a series into a caller-provided (temporary) folder; the
caller renames that folder into place only when every instance arrived (see
:func:`medseg.pacs.run.retrieve_into`).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pydicom
from pydicom.dataset import Dataset

from medseg.errors import ConfigError
from medseg.io.dicom import read_dataset
from medseg.pacs.errors import (
    PacsAuthError,
    PacsConnectionError,
    PacsError,
    PacsNotFoundError,
    PacsProtocolError,
)
from medseg.pacs.profile import DicomWebConfig, PacsProfile, read_secret, token_source
from medseg.pacs.query import (
    QueryFilters,
    RemoteSeries,
    dataset_attributes,
    filter_results,
    requested_fields,
    server_value,
    sort_series,
)
from medseg.pacs.transport import BACKOFF_MAX_S, check_uid

__all__ = ["DicomWebClient", "make_session"]

_RETRY_STATUS = (429, 500, 502, 503, 504)
_log = logging.getLogger("medseg.pacs")


# ------------------------------------------------------------------ logging
class _RedactQuery(logging.Filter):
    """Strip query strings and Authorization values from library log records (they can hold PHI/secrets)."""

    _query = re.compile(r"(\?|%3F)[^\s'\"]*")
    _auth = re.compile(r"(['\"]?Authorization['\"]?\s*[:=]\s*['\"]?)[^'\",}]+", re.IGNORECASE)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        cleaned = self._auth.sub(r"\1<redacted>", self._query.sub(r"\1<redacted>", message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = _RedactQuery()
for _name in ("urllib3.connectionpool", "urllib3.util.retry", "dicomweb_client", "dicomweb_client.web"):
    _logger = logging.getLogger(_name)
    if _FILTER not in _logger.filters:
        _logger.addFilter(_FILTER)


# ------------------------------------------------------------------ session
class _BearerAuth:
    """``Authorization: Bearer`` from a token source (re-read when a token file changes)."""

    def __init__(self, token: Any) -> None:
        self._token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token()}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<redacted>)"


class _BasicAuth:
    """HTTP basic auth whose ``repr`` hides the password."""

    def __init__(self, username: str, password: str) -> None:
        import requests

        self._auth = requests.auth.HTTPBasicAuth(username, password)

    def __call__(self, request: Any) -> Any:
        return self._auth(request)

    def __repr__(self) -> str:
        return "BasicAuth(<redacted>)"


def make_session(profile: PacsProfile) -> Any:
    """A ``requests.Session`` with the profile's auth, TLS settings and retry policy.

    Raises:
        ConfigError: Missing secret or certificate file.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    cfg = _config(profile)
    session = requests.Session()
    auth = cfg.auth
    if auth.type == "basic":
        assert auth.username is not None
        password = read_secret(profile, env=auth.password_env, file=auth.password_file, what="dicomweb.auth.password")
        session.auth = _BasicAuth(auth.username, password)
    elif auth.type == "bearer":
        session.auth = _BearerAuth(token_source(profile, auth, "dicomweb.auth"))
    if isinstance(cfg.verify_tls, str):
        bundle = profile.path(cfg.verify_tls)
        if not bundle.is_file():
            raise ConfigError(f"{profile.source}: dicomweb.verify_tls: CA bundle {bundle} not found")
        session.verify = str(bundle)
    else:
        session.verify = bool(cfg.verify_tls)
    if cfg.client_cert:
        cert = profile.path(cfg.client_cert)
        key = profile.path(cfg.client_key) if cfg.client_key else None
        for p in (cert, key):
            if p is not None and not p.is_file():
                raise ConfigError(f"{profile.source}: dicomweb client certificate/key {p} not found")
        session.cert = (str(cert), str(key)) if key else str(cert)
    retry = Retry(
        total=cfg.retries,
        connect=cfg.retries,
        read=cfg.retries,
        status=cfg.retries,
        other=0,
        backoff_factor=cfg.backoff_s,
        backoff_max=BACKOFF_MAX_S,
        status_forcelist=_RETRY_STATUS,
        allowed_methods=frozenset({"GET", "HEAD", "POST"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=4)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False  # no proxies or netrc credentials picked up behind the profile's back
    return session


def _config(profile: PacsProfile) -> DicomWebConfig:
    if profile.dicomweb is None:
        raise ConfigError(f"{profile.source}: the profile has no dicomweb section")
    return profile.dicomweb


def _network_reason(exc: BaseException) -> str:
    """A short reason for a connection failure, without URLs (they may carry PHI in the query)."""
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        found = re.search(r"(certificate verify failed[^'\")]*|wrong version number|SSL[^'\")]{0,80})", text)
        return "TLS error: " + (found.group(1).strip() if found else "handshake failed")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "no answer within the read timeout"
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host name"),
        ("Temporary failure in name resolution", "host name lookup failed"),
        ("Connection reset", "connection reset by the server"),
        ("Connection broken", "the connection broke during the transfer"),
        ("RemoteDisconnected", "the server closed the connection"),
        ("Remote end closed", "the server closed the connection"),
        ("timed out", "timed out"),
        ("No route to host", "no route to host"),
    ):
        if needle in text:
            return reason
    return f"connection failed ({type(exc).__name__})"


class DicomWebClient:
    """DICOMweb access to one PACS (thread-compatible: use one instance per thread).

    Args:
        profile: The PACS profile (its ``dicomweb`` section is used).
    """

    def __init__(self, profile: PacsProfile) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.profile = profile
        self.config = _config(profile)
        self.session = make_session(profile)
        self.client = DICOMwebClient(
            self.config.url,
            session=self.session,
            qido_url_prefix=self.config.qido_prefix,
            wado_url_prefix=self.config.wado_prefix,
            stow_url_prefix=self.config.stow_prefix,
            timeout=(self.config.connect_timeout_s, self.config.read_timeout_s),
        )
        self.client.set_http_retry_params(retry=False)
        parts = urlsplit(self.config.url)
        self.where = f"{profile.label} ({parts.scheme}://{parts.netloc}{parts.path})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self.session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ errors
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate requests/dicomweb-client exceptions into :class:`PacsError` (no URLs, no bodies)."""
        import requests

        try:
            yield
        except PacsError:
            raise
        except requests.exceptions.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            reason = exc.response.reason if exc.response is not None else ""
            head = f"{self.where}: HTTP {status} {reason}".rstrip() + f" while {what}"
            if status in (401, 403):
                raise PacsAuthError(
                    f"{head}: the server refused the credentials (check the auth section of {self.profile.source})"
                ) from None
            if status in (404, 410):
                raise PacsNotFoundError(f"{head}: not on the server (deleted or moved?)") from None
            if status in _RETRY_STATUS:
                raise PacsConnectionError(f"{head} (still failing after {self.config.retries} retries)") from None
            raise PacsProtocolError(head) from None
        except requests.exceptions.RetryError:
            raise PacsConnectionError(
                f"{self.where}: gave up {what} after {self.config.retries} retries (server errors)"
            ) from None
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise PacsConnectionError(
                f"{self.where}: {_network_reason(exc)} while {what} (after {self.config.retries} retries)"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise PacsProtocolError(f"{self.where}: {type(exc).__name__} while {what}") from None

    # ------------------------------------------------------------ QIDO-RS
    def _qido(self, path: str, params: Mapping[str, str], fields: Sequence[str]) -> list[dict[str, Any]]:
        """GET a QIDO-RS resource, following limit/offset pages; DICOM JSON objects."""
        cfg = self.config
        prefix = f"/{self.config.qido_prefix}" if self.config.qido_prefix else ""
        base = f"{cfg.url}{prefix}/{path}"
        query = [f"{k}={quote(v, safe='*?,-._~^:')}" for k, v in params.items()]
        query += [f"includefield={f}" for f in fields]
        results: list[dict[str, Any]] = []
        offset = 0
        page = cfg.page_size
        for _ in range(cfg.max_results // page + 2):
            url = f"{base}?{'&'.join([*query, f'limit={page}', f'offset={offset}'])}"
            response = self.session.get(
                url,
                headers={"Accept": "application/dicom+json"},
                timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
            )
            if response.status_code == 204:
                break
            response.raise_for_status()
            try:
                chunk = response.json() if response.content else []
            except ValueError:
                raise PacsProtocolError(f"{self.where}: QIDO-RS answer to /{path} is not JSON") from None
            if not isinstance(chunk, list):
                raise PacsProtocolError(f"{self.where}: QIDO-RS answer to /{path} is not a JSON array")
            results += chunk
            if len(chunk) < page or len(results) >= cfg.max_results:
                break
            offset += len(chunk)
        return results[: cfg.max_results]

    def _search(
        self, path: str, filters: Mapping[str, str | list[str]], fields: Sequence[str], what: str
    ) -> list[Dataset]:
        params: dict[str, str] = {}
        for keyword, value in filters.items():
            sent = server_value(keyword, value, url=True)
            if sent is not None:
                params[keyword] = sent
        with self._errors(what):
            raw = self._qido(path, params, fields)
        datasets = []
        for item in raw:
            try:
                datasets.append(Dataset.from_json(item))
            except Exception:
                raise PacsProtocolError(f"{self.where}: malformed DICOM JSON in the answer while {what}") from None
        return filter_results(datasets, filters)

    def search_studies(
        self, filters: Mapping[str, str | list[str]] | None = None, *, fields: Sequence[str] = ()
    ) -> list[Dataset]:
        """QIDO-RS ``/studies`` with study-level filters (checked locally too)."""
        filters = dict(filters or {})
        return self._search("studies", filters, requested_fields("study", filters, fields), "searching studies")

    def search_series(
        self,
        filters: Mapping[str, str | list[str]] | None = None,
        *,
        study_uid: str | None = None,
        fields: Sequence[str] = (),
    ) -> list[Dataset]:
        """QIDO-RS ``/studies/{study}/series`` (or ``/series``) with series-level filters."""
        filters = dict(filters or {})
        path = f"studies/{check_uid(study_uid, self.where)}/series" if study_uid else "series"
        return self._search(path, filters, requested_fields("series", filters, fields), "searching series")

    def search_instances(
        self, study_uid: str, series_uid: str, *, sop_instance_uid: str | None = None
    ) -> list[Dataset]:
        """QIDO-RS instances of a series (optionally one SOPInstanceUID)."""
        filters: dict[str, str | list[str]] = {}
        if sop_instance_uid:
            filters["SOPInstanceUID"] = check_uid(sop_instance_uid, self.where)
        path = f"studies/{check_uid(study_uid, self.where)}/series/{check_uid(series_uid, self.where)}/instances"
        try:
            return self._search(path, filters, ["SOPInstanceUID", "SOPClassUID"], "searching instances")
        except PacsNotFoundError:
            return []

    def has_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bool:
        """Whether the server holds this instance."""
        found = self.search_instances(study_uid, series_uid, sop_instance_uid=sop_instance_uid)
        return any(str(ds.get("SOPInstanceUID", "")) == sop_instance_uid for ds in found)

    def ping(self) -> None:
        """One cheap QIDO-RS request (checks address, TLS and credentials).

        Raises:
            PacsError: The server cannot be used.
        """
        with self._errors("checking the connection"):
            self._ping()

    def _ping(self) -> None:
        cfg = self.config
        prefix = f"/{cfg.qido_prefix}" if cfg.qido_prefix else ""
        response = self.session.get(
            f"{cfg.url}{prefix}/studies?limit=1",
            headers={"Accept": "application/dicom+json"},
            timeout=(cfg.connect_timeout_s, cfg.read_timeout_s),
        )
        if response.status_code != 204:
            response.raise_for_status()

    def query(self, filters: QueryFilters, *, extra_fields: Sequence[str] = ()) -> list[RemoteSeries]:
        """Series matching the filters: studies first, then each study's series.

        Args:
            filters: Study- and series-level filters.
            extra_fields: More series-level attributes to return (e.g. those the selection rules read).

        Returns:
            The series (at most ``filters.limit``), sorted by study date, study and series number.
        """
        studies = self.search_studies(filters.study)
        found: list[RemoteSeries] = []
        for study in studies:
            study_attrs = dataset_attributes(study)
            study_uid = str(study_attrs.get("StudyInstanceUID") or "")
            if not study_uid:
                continue
            for series in self.search_series(filters.series, study_uid=study_uid, fields=extra_fields):
                item = RemoteSeries.from_datasets(study_attrs, dataset_attributes(series))
                item.study_uid = item.study_uid or study_uid
                if item.series_uid:
                    found.append(item)
                if filters.limit is not None and len(found) >= filters.limit:
                    return sort_series(found)
        return sort_series(found)

    # ------------------------------------------------------------ WADO-RS
    def retrieve_series(self, study_uid: str, series_uid: str, dest: Path, *, expected: int | None = None) -> int:
        """Download every instance of a series into ``dest`` (one ``<SOPInstanceUID>.dcm`` per instance).

        Instances are requested in their stored transfer syntax (no server-side transcoding).
        ``dest`` should be a temporary folder that the caller renames into place on success.

        Returns:
            The number of instances written.

        Raises:
            PacsNotFoundError: The series is no longer on the server.
            PacsProtocolError: A malformed instance, an instance of another series, or fewer
                instances than ``expected``.
            PacsConnectionError: The server went away.
        """
        study_uid, series_uid = check_uid(study_uid, self.where), check_uid(series_uid, self.where)
        what = f"retrieving series {series_uid}"
        dest.mkdir(parents=True, exist_ok=True)
        count = 0
        with self._errors(what):
            try:
                iterator = self.client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
                for ds in iterator:
                    _write_instance(ds, dest, series_uid=series_uid, where=f"{self.where}: {what}")
                    count += 1
            except PacsError:
                raise
            except (ValueError, EOFError, KeyError, AttributeError, TypeError, pydicom.errors.InvalidDicomError) as e:
                raise PacsProtocolError(
                    f"{self.where}: {what}: instance {count + 1} is malformed ({type(e).__name__}: {_short(e)})"
                ) from None
        if count == 0:
            raise PacsNotFoundError(f"{self.where}: {what}: the server returned no instances (series deleted?)")
        if expected is not None and count < expected:
            raise PacsProtocolError(
                f"{self.where}: {what}: got {count} of the {expected} instances the query listed (still arriving?)"
            )
        return count

    # ------------------------------------------------------------ STOW-RS
    def store(self, paths: Sequence[Path], *, study_uid: str | None = None) -> int:
        """Upload DICOM files with STOW-RS (one request).

        Returns:
            The number of instances the server accepted.

        Raises:
            PacsProtocolError: The server refused an instance (its failure reason is given).
            PacsAuthError, PacsConnectionError: See :meth:`_errors`.
        """
        datasets = []
        for path in paths:
            try:
                datasets.append(read_dataset(path))
            except (OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
                raise PacsError(f"{path}: cannot read the DICOM file to store ({_short(exc)})") from None
        total = sum(Path(p).stat().st_size for p in paths)
        what = f"storing {len(paths)} instance(s)"
        # Unchunked body (length known, retries resend it whole): chunk size above the message size.
        self.client.set_chunk_size(max(10**6, 2 * total + (1 << 20)))
        with self._errors(what):
            response = self.client.store_instances(
                datasets, study_instance_uid=check_uid(study_uid, self.where) if study_uid else None
            )
        failed = list(getattr(response, "FailedSOPSequence", []) or [])
        if failed:
            reasons = ", ".join(
                f"{item.get('ReferencedSOPInstanceUID', '?')}: reason 0x{int(item.get('FailureReason', 0)):04X}"
                for item in failed[:5]
            )
            raise PacsProtocolError(f"{self.where}: STOW-RS refused {len(failed)} instance(s): {reasons}")
        accepted = list(getattr(response, "ReferencedSOPSequence", []) or [])
        return len(accepted) if accepted else len(datasets)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = re.sub(r"https?://\S+", "<url>", str(exc))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_instance(ds: Dataset, dest: Path, *, series_uid: str, where: str) -> Path:
    """Write one retrieved instance as ``<SOPInstanceUID>.dcm`` (Part 10) in ``dest``."""
    from pydicom.dataset import FileMetaDataset

    got_series = str(ds.get("SeriesInstanceUID", "") or "")
    if got_series != series_uid:
        raise PacsProtocolError(f"{where}: the server sent an instance of another series ({got_series or 'none'})")
    sop = check_uid(str(ds.get("SOPInstanceUID", "") or ""), where)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
        implicit = getattr(ds, "is_implicit_VR", False)
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
        ds.file_meta = meta
    path = dest / f"{sop}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path
