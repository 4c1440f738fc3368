"""DIMSE (the DICOM network protocol) with pynetdicom: C-FIND, C-GET/C-MOVE, C-STORE and a storage SCP.

* :class:`DimseClient` queries a PACS (Study Root C-FIND, studies then series, with the same
  filters and local verification as DICOMweb, see :mod:`medseg.pacs.query`), retrieves a series
  with C-GET (the storage sub-operations come back on the same association) or C-MOVE (the
  PACS opens an association to a temporary storage SCP of ours, which the PACS must know as
  ``move_aet`` at this host and ``move_port``), and stores results with C-STORE.
* :class:`StorageReceiver` is a C-STORE SCP: every received instance is written atomically
  (temporary file + rename) as ``<SOPInstanceUID>.dcm`` in the folder its ``target`` callback
  chooses - byte for byte as received (pynetdicom's ``encoded_dataset``), never re-encoded.
  ``medseg listen`` and C-MOVE retrieval use it.

Associations are retried with exponential backoff when the peer cannot be reached; a rejected
association (unknown AE title) is an authentication error and is not retried.  Every network
wait is bounded by the profile's timeouts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from medseg.pacs.profile import DimseConfig, PacsProfile
from medseg.pacs.query import (
    QueryFilters,
    RemoteSeries,
    dataset_attributes,
    filter_results,
    requested_fields,
    server_value,
    sort_series,
)
from medseg.pacs.transport import backoff_delay, check_uid

__all__ = ["DimseClient", "ReceivedInstance", "StorageReceiver"]

_log = logging.getLogger("medseg.pacs")
#: Transfer syntaxes offered when receiving (besides the uncompressed defaults): originals are kept.
_COMPRESSED = (
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)
#: Storage classes asked for in C-GET when the series' classes cannot be found by C-FIND.
_COMMON_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128",  # PET
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.20",  # NM
    "1.2.840.10008.5.1.4.1.1.6.1",  # US
    "1.2.840.10008.5.1.4.1.1.1",  # CR
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary capture
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
)
_STATUS_TEXT = {
    0xA700: "out of resources",
    0xA701: "out of resources (cannot calculate the number of matches)",
    0xA702: "out of resources (cannot perform sub-operations)",
    0xA801: "move destination unknown to the PACS (register the AE title, host and port there)",
    0xA900: "identifier does not match the SOP class",
    0xAA00: "none of the offered storage classes were accepted",
    0xC000: "unable to process",
    0xFE00: "cancelled",
}


def _status_text(code: int) -> str:
    text = _STATUS_TEXT.get(code)
    if text is None and 0xC000 <= code <= 0xCFFF:
        text = "unable to process"
    return f"status 0x{code:04X}" + (f" ({text})" if text else "")


def _config(profile: PacsProfile) -> DimseConfig:
    if profile.dimse is None:
        raise ConfigError(f"{profile.source}: the profile has no dimse section")
    return profile.dimse


# ================================================================ receiving
@dataclass(frozen=True)
class ReceivedInstance:
    """One instance written by :class:`StorageReceiver`."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    description: str
    series_number: int | None
    calling_aet: str


def write_encoded(data: bytes, folder: Path, sop_instance_uid: str) -> Path:
    """Write received Part-10 bytes atomically as ``folder/<SOPInstanceUID>.dcm``."""
    from medseg.io.images import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_instance_uid}.dcm"
    with atomic_path(path, overwrite=True) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


class StorageReceiver:
    """A C-STORE SCP writing each received instance into the folder ``target(dataset)`` returns.

    Args:
        aet: Our AE title.
        bind: Address to listen on.
        port: TCP port.
        target: Folder for a received dataset (header decoded), ``None`` to refuse it.
        on_stored: Called after each instance is written (from pynetdicom's threads).
        allowed_aets: Calling AE titles accepted (``None``: any).
        network_timeout_s: Idle network timeout of an association.
    """

    def __init__(
        self,
        *,
        aet: str,
        bind: str,
        port: int,
        target: Callable[[Dataset], Path | None],
        on_stored: Callable[[ReceivedInstance], None] | None = None,
        allowed_aets: Sequence[str] | None = None,
        network_timeout_s: float = 120.0,
    ) -> None:
        self.aet, self.bind, self.port = aet, bind, port
        self.target, self.on_stored = target, on_stored
        self.allowed_aets = list(allowed_aets or [])
        self.network_timeout_s = network_timeout_s
        self.received = 0
        self.refused = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> StorageReceiver:
        """Start listening (background threads).

        Raises:
            PacsError: The address cannot be bound (port in use, no permission).
        """
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title=self.aet)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.network_timeout = self.network_timeout_s
        ae.maximum_associations = 8
        if self.allowed_aets:
            ae.require_calling_aet = self.allowed_aets
        try:
            self._server = ae.start_server(
                (self.bind, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as exc:
            raise PacsError(
                f"storage SCP {self.aet}: cannot listen on {self.bind}:{self.port} ({exc.strerror or exc})"
            ) from None
        return self

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StorageReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop = check_uid(ds.get("SOPInstanceUID") or event.request.AffectedSOPInstanceUID, "received instance")
            series = check_uid(ds.get("SeriesInstanceUID"), "received instance")
            study = check_uid(ds.get("StudyInstanceUID"), "received instance")
        except Exception as exc:  # unparseable or without UIDs: refuse this instance, keep the association
            self._note_refused(f"from {calling}: cannot use the instance ({type(exc).__name__}: {exc})")
            return 0xC210  # cannot understand
        folder = self.target(ds)
        if folder is None:
            self._note_refused(f"from {calling}: instance of series {series} not expected here")
            return 0xC211
        try:
            path = write_encoded(event.encoded_dataset(include_meta=True), folder, sop)
        except OSError as exc:
            self._note_refused(f"from {calling}: cannot write {folder} ({exc.strerror or exc})")
            return 0xA700  # out of resources
        number = ds.get("SeriesNumber")
        item = ReceivedInstance(
            path=path,
            sop_instance_uid=sop,
            series_uid=series,
            study_uid=study,
            modality=str(ds.get("Modality", "") or ""),
            description=str(ds.get("SeriesDescription", "") or ""),
            series_number=int(number) if number not in (None, "") else None,
            calling_aet=calling,
        )
        with self._lock:
            self.received += 1
        if self.on_stored is not None:
            try:
                self.on_stored(item)
            except Exception as exc:  # the file is safe on disk; recovery rescans the folder
                _log.error("storage SCP %s: recording %s failed: %s", self.aet, sop, exc)
        return 0x0000

    def _note_refused(self, message: str) -> None:
        with self._lock:
            self.refused += 1
            self.errors.append(message)
            del self.errors[:-50]
        _log.warning("storage SCP %s: %s", self.aet, message)


# ================================================================ client
class DimseClient:
    """DIMSE access to one PACS.

    Args:
        profile: The PACS profile (its ``dimse`` section is used).
    """

    def __init__(self, profile: PacsProfile) -> None:
        self.profile = profile
        self.config = _config(profile)
        cfg = self.config
        self.where = f"{profile.label} ({cfg.called_aet}@{cfg.host}:{cfg.port})"

    def close(self) -> None:
        """Nothing to close (associations are per operation)."""

    def __enter__(self) -> DimseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ association
    def _ae(self) -> Any:
        from pynetdicom import AE

        cfg = self.config
        ae = AE(ae_title=cfg.calling_aet)
        ae.connection_timeout = cfg.connect_timeout_s
        ae.acse_timeout = cfg.acse_timeout_s
        ae.dimse_timeout = cfg.dimse_timeout_s
        ae.network_timeout = cfg.network_timeout_s
        return ae

    @contextlib.contextmanager
    def _association(
        self,
        contexts: Sequence[Any],
        *,
        what: str,
        ext_neg: list[Any] | None = None,
        handlers: list[Any] | None = None,
    ) -> Iterator[Any]:
        """An established association (released afterwards); retried with backoff if unreachable."""
        cfg = self.config
        ae = self._ae()
        for context in contexts:
            if isinstance(context, tuple):
                ae.add_requested_context(context[0], list(context[1]))
            else:
                ae.add_requested_context(context)
        assoc = None
        for attempt in range(cfg.retries + 1):
            if attempt:
                time.sleep(backoff_delay(cfg.backoff_s, attempt))
            assoc = ae.associate(
                cfg.host, cfg.port, ae_title=cfg.called_aet, ext_neg=ext_neg, evt_handlers=handlers or None
            )
            if assoc.is_established:
                break
            if assoc.is_rejected:
                raise PacsAuthError(
                    f"{self.where}: association rejected while {what} (is calling AE title {cfg.calling_aet!r}"
                    f" registered on the PACS, and {cfg.called_aet!r} its AE title?)"
                )
        if assoc is None or not assoc.is_established:
            raise PacsConnectionError(
                f"{self.where}: cannot open an association while {what} (unreachable, refused or aborted;"
                f" {cfg.retries} retries)"
            )
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def echo(self) -> None:
        """C-ECHO (checks address, AE titles and that the PACS answers).

        Raises:
            PacsError: The PACS cannot be used.
        """
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        with self._association([Verification], what="checking the connection (C-ECHO)") as assoc:
            status = assoc.send_c_echo()
        if not status or int(status.Status) != 0:
            raise PacsProtocolError(f"{self.where}: C-ECHO failed")

    # ------------------------------------------------------------ C-FIND
    def find(
        self, level: str, filters: Mapping[str, str | list[str]], fields: Sequence[str], *, what: str
    ) -> list[Dataset]:
        """Study Root C-FIND at ``level`` (``STUDY``, ``SERIES``, ``IMAGE``), results checked locally."""
        from pydicom.datadict import dictionary_VR, tag_for_keyword
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FindModel  # type: ignore[attr-defined]

        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword in fields:
            if keyword not in filters:
                tag = tag_for_keyword(keyword)
                vr = dictionary_VR(tag) if tag is not None else ""
                if vr != "SQ":
                    setattr(identifier, keyword, None if vr in ("US", "UL", "SS", "SL", "FL", "FD") else "")
        for keyword, value in filters.items():
            sent = server_value(keyword, value, url=False)
            setattr(identifier, keyword, sent if sent is not None else "")
        results: list[Dataset] = []
        with self._association([FindModel], what=what) as assoc:
            for status, found in assoc.send_c_find(identifier, FindModel):
                if not status:
                    raise PacsConnectionError(f"{self.where}: no answer while {what} (timeout or aborted)")
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if found is not None:
                        results.append(found)
                    if len(results) > self.config.max_results:
                        assoc.send_c_cancel(1, query_model=FindModel)
                        break
                elif code == 0x0000:
                    break
                else:
                    raise PacsProtocolError(f"{self.where}: C-FIND failed while {what}: {_status_text(code)}")
        return filter_results(results[: self.config.max_results], filters)

    def query(self, filters: QueryFilters, *, extra_fields: Sequence[str] = ()) -> list[RemoteSeries]:
        """Series matching the filters (studies first, then each study's series)."""
        studies = self.find("STUDY", filters.study, requested_fields("study", filters.study), what="searching studies")
        found: list[RemoteSeries] = []
        for study in studies:
            study_attrs = dataset_attributes(study)
            study_uid = str(study_attrs.get("StudyInstanceUID") or "")
            if not study_uid:
                continue
            series_filters = {**filters.series, "StudyInstanceUID": study_uid}
            for series in self.find(
                "SERIES",
                series_filters,
                requested_fields("series", series_filters, extra_fields),
                what="searching series",
            ):
                item = RemoteSeries.from_datasets(study_attrs, dataset_attributes(series))
                if item.series_uid:
                    found.append(item)
                if filters.limit is not None and len(found) >= filters.limit:
                    return sort_series(found)
        return sort_series(found)

    def find_instances(self, study_uid: str, series_uid: str, *, sop_instance_uid: str | None = None) -> list[Dataset]:
        """IMAGE-level C-FIND of a series (SOPInstanceUID, SOPClassUID)."""
        filters: dict[str, str | list[str]] = {
            "StudyInstanceUID": check_uid(study_uid, self.where),
            "SeriesInstanceUID": check_uid(series_uid, self.where),
        }
        if sop_instance_uid:
            filters["SOPInstanceUID"] = check_uid(sop_instance_uid, self.where)
        fields = ["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID"]
        return self.find("IMAGE", filters, fields, what=f"listing the instances of series {series_uid}")

    def has_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bool:
        """Whether the PACS holds this instance."""
        found = self.find_instances(study_uid, series_uid, sop_instance_uid=sop_instance_uid)
        return any(str(ds.get("SOPInstanceUID", "")) == sop_instance_uid for ds in found)

    # ------------------------------------------------------------ retrieve
    def retrieve_series(
        self, study_uid: str, series_uid: str, dest: Path, *, expected: int | None = None, method: str | None = None
    ) -> int:
        """Retrieve a series into ``dest`` (one ``<SOPInstanceUID>.dcm`` per instance) by C-GET or C-MOVE.

        Returns:
            Instances written.

        Raises:
            PacsNotFoundError: The PACS has no such series (any more).
            PacsProtocolError: Failed sub-operations, or fewer instances than ``expected``.
            PacsConnectionError: The PACS went away.
        """
        study_uid, series_uid = check_uid(study_uid, self.where), check_uid(series_uid, self.where)
        method = method or self.config.retrieve
        what = f"retrieving series {series_uid} (C-{method.upper()})"
        instances = self.find_instances(study_uid, series_uid)
        if not instances:
            raise PacsNotFoundError(f"{self.where}: {what}: the PACS has no instances of this series (deleted?)")
        classes = sorted({str(ds.get("SOPClassUID", "") or "") for ds in instances} - {""})
        dest.mkdir(parents=True, exist_ok=True)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study_uid
        identifier.SeriesInstanceUID = series_uid
        if method == "get":
            count, failed = self._c_get(identifier, classes, dest, series_uid, what)
        else:
            count, failed = self._c_move(identifier, dest, series_uid, what)
        if failed:
            raise PacsProtocolError(f"{self.where}: {what}: {failed} sub-operation(s) failed")
        if count == 0:
            raise PacsNotFoundError(f"{self.where}: {what}: no instance arrived")
        wanted = max(expected or 0, len(instances))
        if count < wanted:
            raise PacsProtocolError(f"{self.where}: {what}: got {count} of {wanted} instances")
        return count

    def _c_get(
        self, identifier: Dataset, classes: list[str], dest: Path, series_uid: str, what: str
    ) -> tuple[int, int]:
        from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GetModel  # type: ignore[attr-defined]

        syntaxes = [*DEFAULT_TRANSFER_SYNTAXES, *_COMPRESSED]
        wanted = list(dict.fromkeys(classes or _COMMON_STORAGE))[:120]
        contexts: list[Any] = [GetModel, *[(uid, syntaxes) for uid in wanted]]
        roles = [build_role(uid, scp_role=True) for uid in wanted]
        written = 0
        lock = threading.Lock()

        def on_store(event: Any) -> int:
            nonlocal written
            try:
                ds = event.dataset
                if str(ds.get("SeriesInstanceUID", "")) != series_uid:
                    return 0xC211
                sop = check_uid(ds.get("SOPInstanceUID"), self.where)
                write_encoded(event.encoded_dataset(include_meta=True), dest, sop)
            except OSError:
                return 0xA700
            except Exception:
                return 0xC210
            with lock:
                written += 1
            return 0x0000

        failed = 0
        with self._association(contexts, what=what, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            final = None
            for status, _ in assoc.send_c_get(identifier, GetModel):
                if not status:
                    raise PacsConnectionError(f"{self.where}: {what}: no answer (timeout or aborted)")
                final = status
                if int(status.Status) not in (0xFF00,):
                    break
            code = int(final.Status) if final is not None else 0xC000
            failed = int(final.get("NumberOfFailedSubOperations", 0) or 0) if final is not None else 0
            if code not in (0x0000, 0xB000):
                raise PacsProtocolError(f"{self.where}: C-GET failed while {what}: {_status_text(code)}")
        return written, failed

    def _c_move(self, identifier: Dataset, dest: Path, series_uid: str, what: str) -> tuple[int, int]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MoveModel  # type: ignore[attr-defined]

        cfg = self.config
        if cfg.move_port is None:
            raise ConfigError(f"{self.profile.source}: dimse.move_port is needed for C-MOVE")
        move_aet = cfg.move_aet or cfg.calling_aet

        def target(ds: Dataset) -> Path | None:
            return dest if str(ds.get("SeriesInstanceUID", "")) == series_uid else None

        receiver = StorageReceiver(
            aet=move_aet, bind=cfg.move_bind, port=cfg.move_port, target=target, network_timeout_s=cfg.network_timeout_s
        )
        failed = 0
        with receiver, self._association([MoveModel], what=what) as assoc:
            final = None
            for status, _ in assoc.send_c_move(identifier, move_aet, MoveModel):
                if not status:
                    raise PacsConnectionError(f"{self.where}: {what}: no answer (timeout or aborted)")
                final = status
                if int(status.Status) != 0xFF00:
                    break
            code = int(final.Status) if final is not None else 0xC000
            failed = int(final.get("NumberOfFailedSubOperations", 0) or 0) if final is not None else 0
            completed = int(final.get("NumberOfCompletedSubOperations", 0) or 0) if final is not None else 0
            if code not in (0x0000, 0xB000):
                raise PacsProtocolError(f"{self.where}: C-MOVE failed while {what}: {_status_text(code)}")
            deadline = time.monotonic() + min(30.0, cfg.network_timeout_s)
            while receiver.received < completed and time.monotonic() < deadline:
                time.sleep(0.05)  # sub-operations are acknowledged before their association closes
        return receiver.received, failed

    # ------------------------------------------------------------ C-STORE
    def store(self, paths: Sequence[Path]) -> int:
        """C-STORE files as they are (their SOP class and transfer syntax are proposed).

        Returns:
            Instances stored (warnings count as stored).

        Raises:
            PacsProtocolError: The PACS refused an instance (status given).
        """
        contexts: dict[str, set[str]] = {}
        for path in paths:
            try:
                ds = read_dataset(path, stop_before_pixels=True)
                sop_class = str(ds.file_meta.MediaStorageSOPClassUID)
                syntax = str(ds.file_meta.TransferSyntaxUID)
            except (OSError, AttributeError, pydicom.errors.InvalidDicomError, ValueError) as exc:
                raise PacsError(f"{path}: cannot read the DICOM file to store ({exc})") from None
            contexts.setdefault(sop_class, set()).add(syntax)
        what = f"storing {len(paths)} instance(s) (C-STORE)"
        stored = 0
        with self._association([(k, sorted(v)) for k, v in contexts.items()], what=what) as assoc:
            for path in paths:
                status = assoc.send_c_store(Path(path))
                if not status:
                    raise PacsConnectionError(f"{self.where}: no answer while {what} (timeout or aborted)")
                code = int(status.Status)
                if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
                    stored += 1
                else:
                    raise PacsProtocolError(f"{self.where}: C-STORE of {Path(path).name} refused: {_status_text(code)}")
        return stored
