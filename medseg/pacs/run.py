"""Query -> retrieve -> segment -> store (``medseg pacs run``) and the push listener (``medseg listen``).

Both work in one output folder and reuse the batch pipeline (:func:`medseg.batch.runner.run_batch`)
for everything between "the series is on disk" and "its outputs are written": series selection
rules with reasons, the SQLite manifest with crash-safe claims and resume, progress, summary.
The PACS layer adds transfer and store state in the same database file
(:class:`medseg.pacs.state.PacsState`)::

    OUT/manifest.sqlite                       batch manifest + pacs_series / pacs_stored / pacs_events
    OUT/inputs/<StudyUID>/<SeriesUID>/*.dcm   retrieved (or received and complete) series: the batch input
    OUT/incoming/<SeriesUID>/*.dcm            listener: instances of series still arriving
    OUT/.pacs-tmp/                            retrievals in flight (removed when a run starts)
    OUT/<StudyUID>/<nnnn-description-hash>/   batch outputs (seg.dcm, rtstruct.dcm, segmentation.nii.gz, ...)
    OUT/summary.json, OUT/pacs_summary.json

``pacs run``: the query (QIDO-RS or C-FIND) lists series; selection rules are applied to the
attributes the query returned (conditions on other attributes wait for the headers); every
selected series not yet complete locally is retrieved into ``OUT/.pacs-tmp/<id>/`` and renamed
to ``OUT/inputs/...`` only when every instance arrived; the batch runner segments what is
pending; with ``store`` every result not yet recorded as stored is sent (STOW-RS or C-STORE)
after asking the destination whether it already has that SOPInstanceUID.  Re-running resumes
and never stores a result twice; a series whose instance count on the PACS changed is
retrieved again (and, being different input, segmented again).

``listen``: a C-STORE SCP writes each received instance atomically into ``OUT/incoming``; a
series with no new instance for ``quiet_s`` seconds is moved into ``OUT/inputs`` (an instance
received again with identical bytes leaves the input untouched, so a re-sent series is not
segmented twice), segmented and its results sent to the profile's store destination.  Files on
disk and the database survive a restart; the next start picks up where the last one stopped.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import ConfigError
from medseg.io.images import write_json_atomic
from medseg.io.paths import check_output_dir, refuse_input_overlap
from medseg.pacs.errors import PacsConnectionError, PacsError, PacsNotFoundError
from medseg.pacs.profile import PacsProfile
from medseg.pacs.query import QueryFilters, RemoteSeries
from medseg.pacs.state import PacsState
from medseg.pacs.transport import is_uid
from medseg.types import PathLike

__all__ = [
    "PacsRunOptions",
    "listen",
    "open_client",
    "pacs_run",
    "query_series",
    "store_results",
]

EventHook = Callable[[str, dict[str, Any]], None]
INPUTS = "inputs"  # = medseg.batch.runner.STAGED_INPUTS (the only input folder OUT may contain)
INCOMING = "incoming"
TMP = ".pacs-tmp"
RESULT_FILES = {"seg": "seg.dcm", "rtstruct": "rtstruct.dcm"}


@dataclass
class PacsRunOptions:
    """Settings of ``pacs run`` / ``listen`` (the CLI flags).

    Attributes:
        outputs: Batch outputs (``seg``, ``rtstruct``, ``nifti``, ``json``).
        store: Send SEG/RTSTRUCT results to the profile's store destination.
        rules: Selection rules (YAML path or mapping); overrides the filters file's ``rules``.
        retry_failed: Segment again series whose segmentation failed before.
        seg_type: DICOM SEG encoding (``binary`` or ``labelmap``).
        device: Inference device (default: the model config's).
        folds: nnU-Net folds (``"0,1"``, ``"all"``; default: every fold found).
        checkpoint: nnU-Net checkpoint, ``final`` or ``best``.
        workers: Batch loader threads.
        progress: Progress bars.
        protocol: Query/retrieve protocol (default: the profile's).
        allow_everything: Allow ``pacs run`` without any filter (every series of the PACS).
        quiet_s: Listener quiet period (default: the profile's).
        engine: Where series are segmented: ``local`` or ``ray`` (see :class:`~medseg.batch.runner.BatchOptions`).
        address: Ray cluster address (``engine="ray"``).
        gpus_per_worker: GPUs per Ray predictor actor.
        cpus_per_reader: CPUs per Ray read/write task.
        infer: Overrides of the model's ``config.infer`` (the inference options of ``medseg batch``).
        compat_check: Skip series that do not fit the model (modality, channels, CT intensities), as
            ``medseg batch`` does; ``False`` = ``--no-compat-check``.
    """

    outputs: tuple[str, ...] = ("seg", "json")
    store: bool = False
    rules: PathLike | Mapping[str, Any] | None = None
    retry_failed: bool = False
    seg_type: Literal["binary", "labelmap"] = "binary"
    device: str | None = None
    folds: str | None = None
    checkpoint: Literal["final", "best"] = "final"
    workers: int | None = 1
    progress: bool = True
    protocol: Literal["dicomweb", "dimse"] | None = None
    allow_everything: bool = False
    quiet_s: float | None = None
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    gpus_per_worker: float | None = None
    cpus_per_reader: float = 1.0
    infer: Mapping[str, Any] = field(default_factory=dict)
    compat_check: bool = True

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible settings."""
        from medseg.batch.runner import OUTPUTS

        bad = [o for o in self.outputs if o not in OUTPUTS]
        if bad or not self.outputs:
            raise ConfigError(f"--outputs: unknown {bad or 'empty list'} (choose from {', '.join(OUTPUTS)})")
        if self.store and not set(RESULT_FILES) & set(self.outputs):
            raise ConfigError("--store needs a DICOM output to send: add seg and/or rtstruct to --outputs")


# ------------------------------------------------------------------ helpers
def open_client(profile: PacsProfile, protocol: str | None = None) -> Any:
    """A :class:`~medseg.pacs.dicomweb.DicomWebClient` or :class:`~medseg.pacs.dimse.DimseClient`."""
    protocol = protocol or profile.query_protocol
    if protocol == "dicomweb":
        from medseg.pacs.dicomweb import DicomWebClient

        return DicomWebClient(profile)
    if protocol == "dimse":
        from medseg.pacs.dimse import DimseClient

        return DimseClient(profile)
    raise ConfigError(f"unknown protocol {protocol!r} (dicomweb or dimse)")


def _uid_dir(uid: str) -> str:
    """A folder name for a UID (the UID itself when valid, else a hash: nothing escapes the folder)."""
    import hashlib

    if is_uid(uid):
        return uid
    return "x-" + hashlib.sha256(uid.encode()).hexdigest()[:24]


def _emit(hook: EventHook | None, event: str, **info: Any) -> None:
    if hook is not None:
        hook(event, info)


def _load_selection(filters: QueryFilters, options: PacsRunOptions, out: Path) -> tuple[Any, Path | None]:
    """The selection rules (parsed) and a YAML path for the batch runner (inline rules are saved)."""
    from medseg.batch.selection import default_rules, load_rules, parse_rules

    rules = options.rules if options.rules is not None else filters.rules
    if rules is None:
        return default_rules(), None
    if isinstance(rules, Mapping):
        from medseg.config import dump_yaml

        parsed = parse_rules(dict(rules), source=f"{filters.source}: rules")
        path = out / ".pacs-rules.yaml"
        dump_yaml(dict(rules), path)
        return parsed, path
    return load_rules(rules), Path(rules)


def _query_time_decision(rules: Any, series: RemoteSeries) -> tuple[bool, str]:
    """Apply the rules to the attributes the query returned; conditions on others wait for the headers."""
    from medseg.batch.selection import Selection, SelectionRules, SeriesInfo

    known = {k for k, v in series.attributes.items() if v not in (None, "", [])}
    reduced = SelectionRules(
        selections=[Selection(s.name, [c for c in s.conditions if c.keyword in known]) for s in rules.selections],
        all_matched=True,
        source=rules.source,
    )
    decision = reduced.decide(SeriesInfo(key=series.series_uid, attributes=dict(series.attributes)))
    if decision.selected:
        return True, f"query matched; {decision.reason} (on the queried attributes)"
    return False, f"at query time: {decision.reason}"


def query_series(
    profile: PacsProfile, filters: QueryFilters, *, protocol: str | None = None, extra_fields: Sequence[str] = ()
) -> list[RemoteSeries]:
    """Series on the PACS matching the filters (see :mod:`medseg.pacs.query`).

    Raises:
        PacsError: The PACS cannot be queried.
    """
    with open_client(profile, protocol) as client:
        found: list[RemoteSeries] = client.query(filters, extra_fields=extra_fields)
        return found


# ------------------------------------------------------------------ retrieval
def _count_instances(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def retrieve_into(client: Any, series: RemoteSeries, out: Path) -> tuple[Path, int]:
    """Retrieve a series into ``OUT/inputs/<study>/<series>``, atomically (temp folder + rename).

    Returns:
        The input folder and the number of instances.
    """
    tmp_root = out / TMP
    tmp_root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_root / uuid.uuid4().hex
    final = out / INPUTS / _uid_dir(series.study_uid) / _uid_dir(series.series_uid)
    try:
        count = client.retrieve_series(series.study_uid, series.series_uid, tmp, expected=series.num_instances)
        final.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        if final.exists():  # the series changed on the PACS: replace the whole folder
            trash = tmp_root / f"trash-{uuid.uuid4().hex}"
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return final, count
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _needs_retrieval(row: Mapping[str, Any], series: RemoteSeries, out: Path) -> bool:
    if row["state"] in ("pending", "failed", "gone"):
        return True
    if row["state"] != "retrieved":
        return False
    folder = out / str(row["input_dir"] or "")
    if not row["input_dir"] or not folder.is_dir():
        return True
    return series.num_instances is not None and series.num_instances != _count_instances(folder)


# ------------------------------------------------------------------ storing
def _result_header(path: Path) -> tuple[str, str, str]:
    from medseg.io.dicom import read_dataset

    tags = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
    ds = read_dataset(path, stop_before_pixels=True, specific_tags=tags)
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)


@dataclass
class _Result:
    """One result object to send."""

    key: str
    source_series_uid: str
    kind: str
    path: Path
    sop_instance_uid: str
    series_uid: str
    study_uid: str


def _pending_results(out: Path, state: PacsState, destination: str) -> list[_Result]:
    """Results of finished series (known to the PACS state) not recorded as stored at ``destination``."""
    from medseg.batch.manifest import Manifest

    with Manifest(out / "manifest.sqlite") as manifest:
        done = manifest.rows("done") + manifest.rows("partial")  # partial: the outputs that were written
    todo = []
    for row in done:
        source = str(row["series_uid"])
        if state.series(source) is None:
            continue
        produced = set(_json_list(row.get("outputs")))
        for kind, name in RESULT_FILES.items():
            path = out / str(row["out_dir"] or "") / name
            if kind not in produced or not path.is_file():
                continue
            try:
                sop, series_uid, study_uid = _result_header(path)
            except Exception as exc:
                state.record_store(
                    key=str(row["key"]),
                    destination=destination,
                    kind=kind,
                    sop_instance_uid="?",
                    series_uid="",
                    study_uid="",
                    file=str(path.relative_to(out)),
                    source_series_uid=source,
                    error=f"{path}: unreadable result ({type(exc).__name__})",
                )
                continue
            if not state.stored(str(row["key"]), destination, kind, sop):
                todo.append(_Result(str(row["key"]), source, kind, path, sop, series_uid, study_uid))
    return todo


def store_results(
    profile: PacsProfile,
    out: PathLike,
    *,
    protocol: str | None = None,
    state: PacsState | None = None,
    progress: bool = False,
    on_event: EventHook | None = None,
) -> dict[str, int]:
    """Send every finished SEG/RTSTRUCT not yet recorded as stored to the profile's store destination.

    Only results of series known to the PACS state (retrieved or received) are sent.  Before
    each upload the destination is asked whether it already has that SOPInstanceUID (a run
    killed between upload and record), so nothing is stored twice.  After a connection failure
    the remaining results are left for the next run.

    Returns:
        Counts: ``stored``, ``present`` (already there), ``failed``, ``left`` (not attempted).
    """
    from tqdm.auto import tqdm

    out = Path(out).resolve()
    protocol = protocol or profile.store_protocol
    destination = profile.label
    counts = {"stored": 0, "present": 0, "failed": 0, "left": 0}
    if not (out / "manifest.sqlite").exists():
        return counts
    own_state = state is None
    state = state or PacsState(out / "manifest.sqlite")
    try:
        todo = _pending_results(out, state, destination)
        if not todo:
            return counts
        with open_client(profile, protocol) as client:
            bar = tqdm(total=len(todo), unit="object", desc="store", disable=not progress, dynamic_ncols=True)
            try:
                for index, item in enumerate(todo):
                    outcome, error = _store_one(client, state, destination, item, out)
                    counts[outcome] += 1
                    bar.update(1)
                    event = "store_failed" if outcome == "failed" else "stored"
                    _emit(on_event, event, key=item.key, kind=item.kind, outcome=outcome, error=error)
                    if isinstance(error, PacsConnectionError):
                        counts["left"] += len(todo) - index - 1
                        break
            finally:
                bar.close()
    finally:
        if own_state:
            state.close()
    return counts


def _json_list(text: Any) -> list[str]:
    import json

    try:
        value = json.loads(text or "[]")
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _store_one(
    client: Any, state: PacsState, destination: str, item: _Result, out: Path
) -> tuple[str, PacsError | None]:
    record = {
        "key": item.key,
        "destination": destination,
        "kind": item.kind,
        "sop_instance_uid": item.sop_instance_uid,
        "series_uid": item.series_uid,
        "study_uid": item.study_uid,
        "file": str(item.path.relative_to(out)),
        "source_series_uid": item.source_series_uid,
    }
    try:
        if client.has_instance(item.study_uid, item.series_uid, item.sop_instance_uid):
            state.record_store(**record, detail="already on the server (stored by an interrupted run)")
            return "present", None
        _store(client, item.path, item.study_uid)
    except PacsError as exc:
        state.record_store(**record, error=str(exc))
        return "failed", exc
    state.record_store(**record)
    return "stored", None


def _store(client: Any, path: Path, study_uid: str) -> None:
    from medseg.pacs.dicomweb import DicomWebClient

    if isinstance(client, DicomWebClient):
        client.store([path], study_uid=study_uid)
    else:
        client.store([path])


# ------------------------------------------------------------------ pacs run
def _batch_options(options: PacsRunOptions, rules_path: Path | None, *, progress: bool) -> Any:
    from medseg.batch.runner import BatchOptions

    return BatchOptions(
        outputs=tuple(options.outputs),
        rules=rules_path,
        retry_failed=options.retry_failed,
        workers=options.workers,
        prefetch=1,
        seg_type=options.seg_type,
        progress=progress,
        device=options.device,
        infer=dict(options.infer),
        compat_check=options.compat_check,
        folds=options.folds,
        checkpoint=options.checkpoint,
        engine=options.engine,
        address=options.address,
        gpus_per_worker=options.gpus_per_worker,
        cpus_per_reader=options.cpus_per_reader,
        handle_sigint=False,  # pacs run / listen stop as a whole on Ctrl-C
    )


def _clean_tmp(out: Path) -> None:
    shutil.rmtree(out / TMP, ignore_errors=True)


def pacs_run(
    profile: PacsProfile,
    model: PathLike,
    filters: QueryFilters,
    out: PathLike,
    options: PacsRunOptions | None = None,
    *,
    on_event: EventHook | None = None,
) -> dict[str, Any]:
    """Query, retrieve, segment and (optionally) store; resumable (see the module docstring).

    Args:
        profile: The PACS.
        model: Model (medseg model directory or nnU-Net folder).
        filters: Which series (study/series filters, optional selection rules and limit).
        out: Output folder.
        options: Run settings.
        on_event: Called with ``(event, info)`` for ``queried``, ``retrieved``, ``retrieve_failed``,
            ``segmented`` and ``stored``/``store_failed`` (progress reporting, tests).

    Returns:
        The summary (also written to ``OUT/pacs_summary.json``): ``pacs`` (transfer and store state
        of every series), ``batch`` (the batch summary) and ``run`` (this run's counts).

    Raises:
        ConfigError: Invalid options, no filters without ``allow_everything``.
        PacsError: The query itself failed (retrieval and store failures are recorded instead).
    """
    from tqdm.auto import tqdm

    from medseg.batch.runner import model_fingerprint, run_batch

    options = options or PacsRunOptions()
    options.validate()
    wall0 = time.perf_counter()
    if not (filters.study or filters.series) and not options.allow_everything:
        raise ConfigError(
            f"{filters.source}: no filters - refusing to retrieve every series of the PACS (pass --all to mean it)"
        )
    refuse_input_overlap([out], [model], what="output folder")
    check_output_dir(out)
    model_fingerprint(model, folds=options.folds, checkpoint=options.checkpoint)  # fail early, before any transfer
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / INPUTS).mkdir(exist_ok=True)
    _clean_tmp(out)
    rules, rules_path = _load_selection(filters, options, out)
    protocol = options.protocol or profile.query_protocol
    stats = {"queried": 0, "selected": 0, "retrieved": 0, "up_to_date": 0, "retrieve_failed": 0, "gone": 0}
    with PacsState(out / "manifest.sqlite") as state, open_client(profile, protocol) as client:
        extra = sorted(rules.keywords)
        found = client.query(filters, extra_fields=extra)
        stats["queried"] = len(found)
        todo: list[RemoteSeries] = []
        for series in found:
            selected, reason = _query_time_decision(rules, series)
            row = state.record_query(
                series_uid=series.series_uid,
                study_uid=series.study_uid,
                origin=f"{profile.label} ({protocol})",
                modality=series.modality,
                description=series.description,
                series_number=series.series_number,
                remote_instances=series.num_instances,
                selected=selected,
                reason=reason,
            )
            _emit(on_event, "queried", series_uid=series.series_uid, selected=selected, reason=reason)
            if selected:
                stats["selected"] += 1
                if _needs_retrieval(row, series, out):
                    todo.append(series)
                else:
                    stats["up_to_date"] += 1
        bar = tqdm(
            total=len(todo), unit="series", desc="retrieve", disable=not (options.progress and todo), dynamic_ncols=True
        )
        try:
            for series in todo:
                _retrieve_one(client, state, series, out, stats, on_event)
                bar.update(1)
        finally:
            bar.close()
            _clean_tmp(out)
    batch = run_batch(out / INPUTS, model, out, _batch_options(options, rules_path, progress=options.progress))
    _emit(on_event, "segmented", done=batch["run"].get("done", 0), failed=batch["run"].get("failed", 0))
    stored = {"stored": 0, "present": 0, "failed": 0, "left": 0}
    if options.store:
        store_protocol = profile.store.protocol or protocol  # a --protocol override applies to storing too
        stored = store_results(profile, out, protocol=store_protocol, progress=options.progress, on_event=on_event)
    with PacsState(out / "manifest.sqlite") as state:
        pacs = state.summary()
    summary = {
        "pacs": pacs,
        "batch": {k: v for k, v in batch.items() if k != "run"},
        "run": {
            "profile": profile.label,
            "protocol": protocol,
            "filters": filters.describe(),
            **stats,
            "segmented": batch["run"].get("done", 0),
            "segment_failed": batch["run"].get("failed", 0),
            **{f"store_{k}": v for k, v in stored.items()},
            "out": str(out),
            "wall_s": round(time.perf_counter() - wall0, 3),
        },
    }
    write_json_atomic(out / "pacs_summary.json", summary)
    return summary


def _retrieve_one(
    client: Any, state: PacsState, series: RemoteSeries, out: Path, stats: dict[str, int], hook: EventHook | None
) -> None:
    try:
        folder, count = retrieve_into(client, series, out)
    except PacsNotFoundError as exc:
        state.mark_failed(series.series_uid, str(exc), gone=True)
        stats["gone"] += 1
        _emit(hook, "retrieve_failed", series_uid=series.series_uid, error=str(exc), gone=True)
    except (PacsError, OSError) as exc:
        message = str(exc) if isinstance(exc, PacsError) else f"{out}: cannot write ({exc})"
        state.mark_failed(series.series_uid, message)
        stats["retrieve_failed"] += 1
        _emit(hook, "retrieve_failed", series_uid=series.series_uid, error=message, gone=False)
    else:
        state.mark_retrieved(series.series_uid, input_dir=str(folder.relative_to(out)), local_instances=count)
        stats["retrieved"] += 1
        _emit(hook, "retrieved", series_uid=series.series_uid, instances=count)


# ------------------------------------------------------------------ listener
def _merge_into(src: Path, dst: Path) -> int:
    """Move the instances of ``src`` into ``dst``; identical files already there stay untouched."""
    dst.mkdir(parents=True, exist_ok=True)
    moved = 0
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        target = dst / path.name
        if target.exists() and filecmp.cmp(path, target, shallow=False):
            path.unlink()
            continue
        os.replace(path, target)
        moved += 1
    return moved


def _complete_quiet(state: PacsState, out: Path, quiet_s: float, hook: EventHook | None) -> list[str]:
    """Move series quiet for ``quiet_s`` from ``incoming`` to ``inputs``; their UIDs."""
    completed = []
    for row in state.quiet_series(quiet_s):
        uid, seen = str(row["series_uid"]), float(row["last_received"] or 0.0)
        src = out / INCOMING / _uid_dir(uid)
        dst = out / INPUTS / _uid_dir(str(row["study_uid"])) / _uid_dir(uid)
        changed = _merge_into(src, dst) if src.is_dir() else 0
        count = _count_instances(dst) if dst.is_dir() else 0
        if count == 0:
            state.mark_failed(uid, f"{src}: the received instances are gone (deleted while the listener was down?)")
            continue
        if state.complete_received(uid, seen_at=seen, input_dir=str(dst.relative_to(out)),
                                             local_instances=count):  # fmt: skip
            completed.append(uid)
            _emit(hook, "complete", series_uid=uid, instances=count, changed=changed)
        with contextlib.suppress(OSError):
            src.rmdir()
    return completed


def _recover_incoming(state: PacsState, out: Path) -> int:
    """After a restart: forget half-written files, re-register series whose instances are on disk."""
    from medseg.io.dicom import read_dataset

    incoming = out / INCOMING
    recovered = 0
    for folder in sorted(p for p in incoming.iterdir() if p.is_dir()) if incoming.is_dir() else []:
        files = []
        for path in folder.iterdir():
            if path.name.startswith("."):
                path.unlink(missing_ok=True)  # an interrupted atomic write
            elif path.is_file():
                files.append(path)
        if not files:
            with contextlib.suppress(OSError):
                folder.rmdir()
            continue
        try:
            ds = read_dataset(files[0], stop_before_pixels=True)
        except Exception:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        row = state.series(uid)
        if row is None or row["state"] != "receiving":
            number = ds.get("SeriesNumber")
            state.note_received(
                series_uid=uid,
                study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                origin="listener (recovered after restart)",
                modality=str(ds.get("Modality", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                series_number=int(number) if number not in (None, "") else None,
            )
            recovered += 1
    return recovered


def listen(
    profile: PacsProfile,
    model: PathLike,
    out: PathLike,
    options: PacsRunOptions | None = None,
    *,
    stop: threading.Event | None = None,
    max_series: int | None = None,
    max_runtime_s: float | None = None,
    on_event: EventHook | None = None,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Receive pushed series, segment each once complete, send the results (until stopped).

    Args:
        profile: Listener settings (``listener`` section) and the store destination.
        model: Model (medseg model directory or nnU-Net folder).
        out: Output folder (the same layout as :func:`pacs_run`).
        options: Outputs, ``store`` (send results), quiet period, rules, ...
        stop: Set it to stop (the CLI sets it on SIGTERM/SIGINT).
        max_series: Stop after this many series were segmented (done or failed).
        max_runtime_s: Stop after this long.
        on_event: Called with ``(event, info)`` for ``received``, ``complete``, ``segmented``, ``stored``.
        on_ready: Called once the SCP accepts associations.

    Returns:
        Counts of this session plus the PACS state summary.
    """
    from medseg.batch.runner import model_fingerprint, run_batch
    from medseg.pacs.dimse import ReceivedInstance, StorageReceiver

    options = options or PacsRunOptions()
    options.validate()
    refuse_input_overlap([out], [model], what="output folder")
    check_output_dir(out)
    model_fingerprint(model, folds=options.folds, checkpoint=options.checkpoint)
    cfg = profile.listener
    quiet = options.quiet_s if options.quiet_s is not None else cfg.quiet_s
    stop = stop or threading.Event()
    out = Path(out).resolve()
    for sub in (INPUTS, INCOMING):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _clean_tmp(out)
    filters = QueryFilters(source="listener")
    _, rules_path = _load_selection(filters, options, out)
    lock = threading.Lock()
    counts = {"received": 0, "completed": 0, "segmented": 0, "segment_failed": 0, "stored": 0, "store_failed": 0}
    with PacsState(out / "manifest.sqlite") as state:
        recovered = _recover_incoming(state, out)

        def target(ds: Any) -> Path:
            return out / INCOMING / _uid_dir(str(ds.SeriesInstanceUID))

        def on_stored(item: ReceivedInstance) -> None:
            state.note_received(
                series_uid=item.series_uid,
                study_uid=item.study_uid,
                origin=f"listener: pushed by {item.calling_aet}",
                modality=item.modality,
                description=item.description,
                series_number=item.series_number,
            )
            with lock:
                counts["received"] += 1
            _emit(on_event, "received", series_uid=item.series_uid, sop_instance_uid=item.sop_instance_uid)

        receiver = StorageReceiver(
            aet=cfg.aet, bind=cfg.bind, port=cfg.port, target=target, on_stored=on_stored,
            allowed_aets=cfg.allowed_aets,
        )  # fmt: skip
        t0 = time.monotonic()
        with receiver:
            if on_ready is not None:
                on_ready()
            cycle_needed = True  # work left by a previous session (pending segmentation, unsent results)
            while True:
                completed = _complete_quiet(state, out, quiet, on_event)
                counts["completed"] += len(completed)
                if completed or cycle_needed:
                    cycle_needed = False
                    batch = run_batch(out / INPUTS, model, out, _batch_options(options, rules_path, progress=False))
                    counts["segmented"] += int(batch["run"].get("done", 0))
                    counts["segment_failed"] += int(batch["run"].get("failed", 0))
                    _emit(on_event, "segmented", done=batch["run"].get("done", 0),
                          failed=batch["run"].get("failed", 0))  # fmt: skip
                    if options.store:
                        sent = store_results(profile, out, state=state, on_event=on_event)
                        counts["stored"] += sent["stored"]
                        counts["store_failed"] += sent["failed"]
                        cycle_needed = bool(sent["failed"] or sent["left"])  # retry unsent results next tick
                done_enough = max_series is not None and counts["segmented"] + counts["segment_failed"] >= max_series
                timed_out = max_runtime_s is not None and time.monotonic() - t0 >= max_runtime_s
                if done_enough or timed_out or stop.wait(cfg.poll_s):
                    break
        summary = {
            "listener": {
                "aet": cfg.aet,
                "address": f"{cfg.bind}:{cfg.port}",
                "recovered": recovered,
                **counts,
                "refused": receiver.refused,
                "refusals": receiver.errors[-10:],
            },
            "pacs": state.summary(),
        }
    write_json_atomic(out / "listen_summary.json", summary)
    return summary
