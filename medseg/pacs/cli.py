"""``medseg pacs {query,run,store,echo}`` and ``medseg listen``.

``add_pacs_parser(subparsers)`` and ``add_listen_parser(subparsers)`` register the subcommands
on the ``medseg`` parser; ``python -m medseg.pacs ...`` runs them standalone.

Credentials are never accepted on the command line: they come from the profile's
``*_env``/``*_file`` settings (see :mod:`medseg.pacs.profile`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from medseg.batch.cli import add_engine_arguments, engine_options, parse_outputs
from medseg.errors import run_reporting_errors
from medseg.infer.cli import add_inference_arguments, add_model_selection_arguments

__all__ = ["add_listen_parser", "add_pacs_parser", "main"]

#: Command-line filter flags -> DICOM keywords.
_FILTER_FLAGS = (
    ("--patient-id", "PatientID", "PatientID (wildcards * ?)"),
    ("--patient-name", "PatientName", "PatientName (wildcards * ?; never printed)"),
    ("--study-date", "StudyDate", "StudyDate or range YYYYMMDD-YYYYMMDD (either side may be empty)"),
    ("--accession", "AccessionNumber", "AccessionNumber"),
    ("--study-uid", "StudyInstanceUID", "StudyInstanceUID (comma-separated list allowed)"),
    ("--modality", "Modality", "series Modality (CT, MR, ...)"),
    ("--series-description", "SeriesDescription", "SeriesDescription (wildcards * ?)"),
    ("--body-part", "BodyPartExamined", "BodyPartExamined"),
    ("--series-uid", "SeriesInstanceUID", "SeriesInstanceUID (comma-separated list allowed)"),
)


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="PACS profile YAML (addresses, AE titles, where credentials are)")
    p.add_argument("--protocol", choices=("dicomweb", "dimse"), default=None, help="override the profile's protocol")


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (combined with --filters FILE; flags win)")
    g.add_argument("--filters", default=None, help="filters YAML: DICOM keyword: value, plus optional rules/limit")
    for flag, _, text in _FILTER_FLAGS:
        g.add_argument(flag, default=None, help=text)
    g.add_argument("--limit", type=int, default=None, help="at most this many series")


def _filters(args: argparse.Namespace) -> Any:
    from medseg.pacs.query import QueryFilters, load_filters, parse_filters

    base = load_filters(args.filters) if args.filters else QueryFilters(source="<no filters file>")
    data: dict[str, Any] = {}
    for flag, keyword, _ in _FILTER_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            data[keyword] = value.split(",") if keyword.endswith("UID") and "," in value else value
    if args.limit is not None:
        data["limit"] = args.limit
    flags = parse_filters(data, source="command line")
    return base.merged(flags) if data else base


def _profile(args: argparse.Namespace) -> Any:
    from medseg.io.paths import refuse_input_overlap
    from medseg.pacs.profile import ListenerConfig, load_profile

    inputs = [getattr(args, name, None) for name in ("profile", "model", "filters", "rules")]
    refuse_input_overlap([getattr(args, "out", None)], inputs, what="output folder")
    profile = load_profile(args.profile)
    updates = {
        key: getattr(args, f"listen_{key}", None)
        for key in ("port", "bind", "aet")
        if getattr(args, f"listen_{key}", None) is not None
    }
    if updates:
        profile.listener = ListenerConfig.model_validate({**profile.listener.model_dump(), **updates})
    return profile


# ------------------------------------------------------------------ query
def _cmd_query(args: argparse.Namespace) -> int:
    from medseg.pacs.run import query_series

    profile = _profile(args)
    filters = _filters(args)
    found = query_series(profile, filters, protocol=args.protocol)
    rows = [s.public() for s in found]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{len(rows)} series on {profile.label} matching {filters.describe()}")
    for r in rows:
        number = "" if r["series_number"] is None else r["series_number"]
        count = "?" if r["instances"] is None else r["instances"]
        print(
            f"  {r['study_date'] or '--------'}  {r['modality'] or '--':4s} #{number!s:<4} {count!s:>5} inst"
            f"  {r['description'][:40]:40s}  {r['series_uid']}"
        )
    return 0


# ------------------------------------------------------------------ run
def _print_run(summary: dict[str, Any]) -> None:
    run = summary["run"]
    pacs = summary["pacs"]
    print(
        f"query: {run['queried']} series, {run['selected']} selected; retrieved {run['retrieved']}"
        f" ({run['up_to_date']} already local, {run['retrieve_failed']} failed, {run['gone']} gone)"
    )
    print(f"segmented: {run['segmented']} done, {run['segment_failed']} failed this run")
    if any(run.get(f"store_{k}") for k in ("stored", "present", "failed", "left")):
        print(
            f"stored: {run['store_stored']} new, {run['store_present']} already there, {run['store_failed']} failed,"
            f" {run['store_left']} left for the next run"
        )
    for item in pacs["transfer_failures"]:
        print(f"  {item['state'].upper()} {item['series_uid']}: {item['error']}")
    for item in pacs["store_failures"]:
        print(f"  STORE FAILED {item['key']} ({item['kind']}): {item['error']}")
    for item in summary["batch"].get("failed", []):
        print(f"  SEGMENTATION FAILED {item['key']}: {item['error']}")
    print(f"summary: {run['out']}/pacs_summary.json")


def _run_options(args: argparse.Namespace, *, store: bool) -> Any:
    from medseg.infer.cli import infer_overrides
    from medseg.pacs.run import PacsRunOptions

    return PacsRunOptions(
        outputs=tuple(args.outputs),
        store=store,
        rules=args.rules,
        retry_failed=getattr(args, "retry_failed", False),
        seg_type=args.seg_type,
        device=args.device,
        folds=args.folds,
        checkpoint=args.checkpoint,
        workers=args.workers if args.workers is not None or getattr(args, "engine", "local") == "ray" else 1,
        progress=not args.quiet,
        protocol=args.protocol,
        allow_everything=getattr(args, "all", False),
        quiet_s=getattr(args, "quiet_s", None),
        infer=infer_overrides(args, device=False),
        compat_check=not args.no_compat_check,
        **(engine_options(args) if hasattr(args, "engine") else {}),
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from medseg.pacs.run import pacs_run

    profile = _profile(args)
    summary = pacs_run(profile, args.model, _filters(args), args.out, _run_options(args, store=args.store))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_run(summary)
    run = summary["run"]
    failed = run["retrieve_failed"] + run["segment_failed"] + run["store_failed"] + run["store_left"]
    return 1 if failed else 0


def _cmd_store(args: argparse.Namespace) -> int:
    from medseg.pacs.run import store_results

    profile = _profile(args)
    counts = store_results(profile, args.out, protocol=args.protocol, progress=not args.quiet)
    if args.json:
        print(json.dumps(counts))
    else:
        print(
            f"stored {counts['stored']} new, {counts['present']} already there, {counts['failed']} failed,"
            f" {counts['left']} left for the next run"
        )
    return 1 if counts["failed"] or counts["left"] else 0


def _cmd_echo(args: argparse.Namespace) -> int:
    from medseg.pacs.run import open_client

    profile = _profile(args)
    with open_client(profile, args.protocol) as client:
        if hasattr(client, "ping"):
            client.ping()
        else:
            client.echo()
    print(f"{client.where}: OK")
    return 0


def _add_segment_options(p: argparse.ArgumentParser, *, default_outputs: tuple[str, ...]) -> None:
    p.add_argument("--model", required=True, help="model: medseg model directory or nnU-Net v2 results folder")
    add_model_selection_arguments(p)
    p.add_argument("--out", required=True, help="output folder (manifest, inputs, results, summaries)")
    p.add_argument(
        "--outputs",
        type=parse_outputs,
        default=default_outputs,
        help=f"comma-separated: seg, rtstruct, nifti, json (default {','.join(default_outputs)})",
    )
    p.add_argument("--rules", default=None, help="series-selection rules YAML (overrides the filters file's rules)")
    p.add_argument("--seg-type", choices=("binary", "labelmap"), default="binary", help="DICOM SEG encoding")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="batch loader threads (default 1); with --engine ray: predictor actors (default: one per GPU or node)",
    )
    p.add_argument(
        "--no-compat-check",
        action="store_true",
        help="segment selected series even when they do not fit the model (modality, channels, CT intensities)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_inference_arguments(p, device_help="auto (default: the model config's), cpu, cuda, cuda:N")


def add_pacs_parser(subparsers: Any) -> None:
    """Register ``medseg pacs`` (query, run, store, echo) on the ``medseg`` command's sub-parsers."""
    p = subparsers.add_parser(
        "pacs",
        help="query a PACS, retrieve series, segment them and store DICOM SEG/RTSTRUCT back (DICOMweb or DIMSE)",
        description="Talk to a PACS described by a YAML profile (see configs/pacs_profile.example.yaml).",
    )
    sub = p.add_subparsers(dest="pacs_command", metavar="COMMAND", required=True)

    q = sub.add_parser("query", help="list series matching filters (QIDO-RS or C-FIND)")
    _add_profile(q)
    _add_filters(q)
    q.add_argument("--json", action="store_true", help="print the series as JSON")
    q.set_defaults(func=_cmd_query)

    r = sub.add_parser(
        "run",
        help="query -> retrieve -> segment -> (--store) store results; resumable",
        description=(
            "Query the PACS, retrieve every selected series into OUT/inputs (atomically), segment them with the"
            " batch pipeline (manifest, selection rules, resume) and with --store send the DICOM SEG/RTSTRUCT"
            " results back. Re-running resumes and never stores a result twice. Exit code 1 if anything failed."
        ),
    )
    _add_profile(r)
    _add_filters(r)
    _add_segment_options(r, default_outputs=("seg", "json"))
    r.add_argument("--store", action="store_true", help="send SEG/RTSTRUCT results to the profile's store target")
    r.add_argument("--retry-failed", action="store_true", help="segment again series that failed before")
    r.add_argument("--all", action="store_true", help="allow running without any filter (every series of the PACS)")
    add_engine_arguments(r)
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("store", help="send finished results not stored yet (e.g. after a PACS outage)")
    _add_profile(s)
    s.add_argument("--out", required=True, help="output folder of a pacs run / listen")
    s.add_argument("--json", action="store_true", help="print the counts as JSON")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_store)

    e = sub.add_parser("echo", help="check address, TLS, credentials / AE titles (QIDO-RS or C-ECHO)")
    _add_profile(e)
    e.set_defaults(func=_cmd_echo)


# ------------------------------------------------------------------ listen
def _cmd_listen(args: argparse.Namespace) -> int:
    from medseg.pacs.run import listen

    profile = _profile(args)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

    def ready() -> None:
        cfg = profile.listener
        if not args.quiet:
            print(f"listening as {cfg.aet} on {cfg.bind}:{cfg.port} (quiet period {args.quiet_s or cfg.quiet_s} s)")
            sys.stdout.flush()

    def event(name: str, info: dict[str, Any]) -> None:
        if args.quiet or name == "received":
            return
        if name == "complete":
            print(f"series {info['series_uid']}: complete ({info['instances']} instances)")
        elif name == "segmented" and (info["done"] or info["failed"]):
            print(f"segmented: {info['done']} done, {info['failed']} failed")
        elif name in ("stored", "store_failed"):
            print(
                f"{info['kind']} of {info['key']}: {info['outcome']}" + (f" ({info['error']})" if info["error"] else "")
            )
        sys.stdout.flush()

    try:
        summary = listen(
            profile,
            args.model,
            args.out,
            _run_options(args, store=not args.no_store),
            stop=stop,
            max_series=args.exit_after,
            max_runtime_s=args.max_runtime,
            on_event=event,
            on_ready=ready,
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        info = summary["listener"]
        print(
            f"listener stopped: {info['received']} instance(s) received, {info['completed']} series complete,"
            f" {info['segmented']} segmented, {info['segment_failed']} failed, {info['stored']} result(s) stored"
        )
    return 1 if summary["listener"]["segment_failed"] or summary["listener"]["store_failed"] else 0


def add_listen_parser(subparsers: Any) -> None:
    """Register ``medseg listen`` (C-STORE SCP: receive, segment, send results) on the ``medseg`` sub-parsers."""
    p = subparsers.add_parser(
        "listen",
        help="receive pushed series (C-STORE SCP), segment each when complete, send the results",
        description=(
            "Run a DICOM storage SCP (profile's listener section). A series with no new instance for the quiet"
            " period is segmented with the batch pipeline and its DICOM SEG/RTSTRUCT sent to the profile's store"
            " destination. Received data and state live in OUT and survive a restart. Stop with Ctrl-C/SIGTERM."
        ),
    )
    p.add_argument("--profile", required=True, help="PACS profile YAML (listener and store destination)")
    p.add_argument("--protocol", choices=("dicomweb", "dimse"), default=None, help=argparse.SUPPRESS)
    _add_segment_options(p, default_outputs=("seg", "json"))
    p.add_argument("--quiet-s", type=float, default=None, help="quiet period in seconds (default: the profile's)")
    p.add_argument("--port", dest="listen_port", type=int, default=None, help="override listener.port")
    p.add_argument("--bind", dest="listen_bind", default=None, help="override listener.bind")
    p.add_argument("--aet", dest="listen_aet", default=None, help="override listener.aet")
    p.add_argument("--no-store", action="store_true", help="segment only, do not send results")
    p.add_argument("--exit-after", type=int, default=None, help="stop after this many series were segmented")
    p.add_argument("--max-runtime", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_cmd_listen)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m medseg.pacs {query,run,store,echo,listen} ...``."""
    parser = argparse.ArgumentParser(prog="python -m medseg.pacs", description="medseg PACS tools")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_pacs_parser(sub)
    add_listen_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("query", "run", "store", "echo"):
        argv = ["pacs", *argv]
    args = parser.parse_args(argv)
    return run_reporting_errors(lambda: args.func(args), command=f"medseg {args.command}", debug=args.debug)
