"""Exported network files (ONNX, TorchScript) as a :class:`~medseg.models.adapters.base.ModelAdapter`.

``medseg export`` (:mod:`medseg.models.export`) writes one file holding the network (the folds of an
nnU-Net model averaged inside the graph) and a versioned JSON document with everything inference needs:
input channels and their normalisation, the preprocessing *recipe* of the source model
(:class:`~medseg.models.adapters.base.PlanRecipe` or
:class:`~medseg.models.adapters.nnunet.NnUNetRecipe`), the window settings, the output decoding and
label names, the inference defaults and the source's fingerprint.  :class:`ExportedModel` returns those
declarations unchanged, so the predictor runs the same pipeline as for the source model; only the
network callables differ:

* **ONNX** (``.onnx``; the document in the model's ``metadata_props`` under ``medseg_export``): run by
  ONNX Runtime on the CPU in float32 (:class:`OnnxNetwork`), with as many intra-op threads as torch has
  (``--threads``).  Needs the ``medseg[onnx]`` extra.
* **TorchScript** (``.pt`` / ``.ts``; the document in the archive's ``extra/medseg_export.json``): loaded
  with ``torch.jit.load`` on the CPU; it goes through the same preparation as any network (bf16 weights
  and channels-last where the hardware has them).

The file is untrusted input.  Its size is checked against
:attr:`~medseg.io.limits.ReadLimits.max_model_bytes` before it is read, the document is parsed with the
bounded JSON reader and validated field by field (unknown versions refused), ONNX models with external
data are refused (they would make the runtime open other files), the graph's input and output shapes must
match the document, and every failure is a :class:`~medseg.errors.ModelError` starting "not a medseg
export".  ONNX files never run code; a TorchScript file is TorchScript code (not pickle) run by
``torch.jit``: load TorchScript exports only from sources you trust, or use ONNX.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from medseg.errors import ConfigError, MedsegError, ModelError
from medseg.models.adapters.base import (
    InputChannel,
    ModelAdapter,
    OutputDecoding,
    PlanRecipe,
    WindowSettings,
    hash_files,
)
from medseg.models.adapters.nnunet import NnUNetRecipe

if TYPE_CHECKING:
    from torch import nn

    from medseg.config import InferConfig

__all__ = [
    "EXPORT_VERSION",
    "METADATA_KEY",
    "ONNX_EXTRA",
    "ExportFormat",
    "ExportMetadata",
    "ExportedModel",
    "export_format",
    "metadata_document",
    "parse_metadata",
    "read_metadata",
]

#: Version of the metadata document (``{"medseg_export": 1, ...}``); other versions are refused.
EXPORT_VERSION = 1
#: ONNX ``metadata_props`` key and TorchScript extra-file stem of the document.
METADATA_KEY = "medseg_export"
TORCHSCRIPT_EXTRA = f"{METADATA_KEY}.json"
#: How to install what ONNX needs.
ONNX_EXTRA = "pip install 'medseg[onnx]' (onnx + onnxruntime)"
#: Graph input and output names.
INPUT_NAME, OUTPUT_NAME = "image", "logits"

ExportFormat = Literal["onnx", "torchscript"]
SUFFIXES: dict[str, ExportFormat] = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}

#: Bounds on declared values (as plans: patch <= 1024 per axis, <= 64 channels, <= 1024 classes).
MAX_PATCH, MAX_CHANNELS, MAX_CLASSES = 1024, 64, 1024


def export_format(path: Path) -> ExportFormat | None:
    """The export format a file name stands for (``.onnx`` / ``.pt`` / ``.ts``), else ``None``."""
    return SUFFIXES.get(path.suffix.lower())


def require_onnx(what: str) -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a :class:`ModelError` naming the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ModelError(f"{what} needs ONNX support ({exc.name} is not installed): {ONNX_EXTRA}") from None
    return onnx, onnxruntime


# ------------------------------------------------------------------------------ the document
@dataclass(frozen=True)
class ExportMetadata:
    """What an exported file declares (the document, validated).

    Attributes:
        format: ``onnx`` or ``torchscript``.
        channels: Input channels.
        preprocessing: The source's recipe.
        window: Window settings (the graph's spatial input size is ``window.patch_size``).
        output: Output decoding and label names.
        infer_defaults: The source's inference defaults.
        networks: Networks averaged inside the graph (folds).
        source: The source model: ``format``, ``path``, ``fingerprint``, ``description``.
        exporter: ``medseg`` and ``torch`` versions that wrote the file.
    """

    format: ExportFormat
    channels: tuple[InputChannel, ...]
    preprocessing: PlanRecipe | NnUNetRecipe
    window: WindowSettings
    output: OutputDecoding
    infer_defaults: InferConfig
    networks: int
    source: dict[str, Any]
    exporter: dict[str, str]


def _recipe_document(recipe: Any) -> dict[str, Any]:
    if isinstance(recipe, PlanRecipe):
        return {"type": "medseg-plan", "plan": recipe.plan.model_dump(mode="json"), "extras": dict(recipe.extras)}
    if isinstance(recipe, NnUNetRecipe):
        return {"type": "nnunet", **recipe.to_dict()}
    raise ModelError(f"cannot export a model whose preprocessing is {type(recipe).__name__}")


def metadata_document(
    adapter: ModelAdapter, *, fmt: ExportFormat, networks: int, exporter: dict[str, str]
) -> dict[str, Any]:
    """The JSON document describing ``adapter`` for an exported file.

    Args:
        adapter: The source model.
        fmt: ``onnx`` or ``torchscript``.
        networks: Networks averaged inside the exported graph.
        exporter: Versions of the writing software.
    """
    window, output = adapter.window, adapter.output
    return {
        METADATA_KEY: EXPORT_VERSION,
        "format": fmt,
        "channels": [asdict(c) for c in adapter.channels],
        "preprocessing": _recipe_document(adapter.preprocessing),
        "window": {
            "patch_size": list(window.patch_size),
            "tiling": window.tiling,
            "sigma_scale": window.sigma_scale,
            "allowed_mirror_axes": list(window.allowed_mirror_axes),
            "spatial_dims": window.spatial_dims,
        },
        "output": {
            "labels": {str(k): v for k, v in output.labels.items()},
            "kind": output.kind,
            "regions": [list(r) for r in output.regions],
            "regions_class_order": list(output.regions_class_order),
        },
        "infer_defaults": adapter.infer_defaults.model_dump(mode="json"),
        "networks": networks,
        "source": {
            "format": str(adapter.describe().get("format", adapter.kind)),
            "path": str(adapter.path),
            "fingerprint": adapter.fingerprint(),
            "description": adapter.describe(),
        },
        "exporter": exporter,
    }


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, what: str, *, max_len: int = MAX_CLASSES) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len:
        raise ValueError(f"{what} must be a list of at most {max_len} entries")
    return value


def _parse_recipe(data: dict[str, Any]) -> PlanRecipe | NnUNetRecipe:
    kind = data.get("type")
    if kind == "medseg-plan":
        from medseg.data.plan import Plan

        return PlanRecipe(plan=Plan.model_validate(data["plan"]), extras=_mapping(data.get("extras", {}), "extras"))
    if kind == "nnunet":
        body = {k: v for k, v in data.items() if k != "type"}
        recipe = NnUNetRecipe.from_dict(body)
        for name in ("transpose_forward", "transpose_backward"):
            if sorted(getattr(recipe, name)) != [0, 1, 2]:
                raise ValueError(f"{name} must be a permutation of 0, 1, 2")
        if not recipe.spacing or not all(0 < s < 1e6 for s in recipe.spacing):
            raise ValueError(f"spacing must be positive, got {list(recipe.spacing)}")
        return recipe
    raise ValueError(f"unknown preprocessing type {kind!r} (medseg-plan, nnunet)")


def _parse_window(data: dict[str, Any]) -> WindowSettings:
    patch = _list(data["patch_size"], "window.patch_size", max_len=3)
    if len(patch) != 3:
        raise ValueError("window.patch_size must have 3 entries")
    tiling = data.get("tiling", "monai")
    if tiling not in ("monai", "nnunet"):
        raise ValueError(f"window.tiling must be monai or nnunet, got {tiling!r}")
    sigma = data.get("sigma_scale", 0.125)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 1:
        raise ValueError(f"window.sigma_scale must be in (0, 1], got {sigma!r}")
    axes = _list(data.get("allowed_mirror_axes", []), "window.allowed_mirror_axes", max_len=3)
    return WindowSettings(
        patch_size=tuple(_int(v, "window.patch_size", 1, MAX_PATCH) for v in patch),  # type: ignore[arg-type]
        tiling=tiling,
        sigma_scale=float(sigma),
        allowed_mirror_axes=tuple(_int(a, "window.allowed_mirror_axes", 0, 2) for a in axes),
        spatial_dims=_int(data.get("spatial_dims", 3), "window.spatial_dims", 2, 3),
    )


def _parse_output(data: dict[str, Any]) -> OutputDecoding:
    raw = _mapping(data["labels"], "output.labels")
    if not raw or len(raw) > MAX_CLASSES:
        raise ValueError(f"output.labels must have 1..{MAX_CLASSES} entries")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        if not str(key).isdigit() or not isinstance(name, str):
            raise ValueError(f"output.labels entries are 'value': 'name', got {key!r}: {name!r}")
        labels[int(key)] = name
    kind = data.get("kind", "softmax")
    if kind == "softmax":
        if sorted(labels) != list(range(len(labels))):
            raise ValueError(f"softmax labels must be 0..K-1, got {sorted(labels)}")
        return OutputDecoding(labels=dict(sorted(labels.items())))
    if kind != "regions":
        raise ValueError(f"output.kind must be softmax or regions, got {kind!r}")
    regions = tuple(
        tuple(_int(v, "output.regions", 0, 2**31) for v in _list(r, "output.regions entry"))
        for r in _list(data.get("regions"), "output.regions")
    )
    order = tuple(_int(v, "output.regions_class_order", 0, 2**31) for v in _list(data.get("regions_class_order"), "x"))
    if not regions or len(order) != len(regions):
        raise ValueError("output.regions and output.regions_class_order must have the same non-zero length")
    return OutputDecoding(
        labels=dict(sorted(labels.items())), kind="regions", regions=regions, regions_class_order=order
    )


def parse_metadata(document: Any, *, source: str) -> ExportMetadata:
    """Validate a metadata document.

    Args:
        document: The parsed JSON.
        source: The file (named in errors).

    Raises:
        ModelError: ``not a medseg export``: an unknown version or any invalid or missing field.
    """
    from pydantic import ValidationError

    from medseg.config import InferConfig

    if not isinstance(document, dict) or METADATA_KEY not in document:
        raise ModelError(f"{source}: not a medseg export (the metadata is not a medseg export document)")
    version = document[METADATA_KEY]
    if version != EXPORT_VERSION:
        raise ModelError(
            f"{source}: not a medseg export this medseg can read (document version {version!r}, "
            f"supported: {EXPORT_VERSION})"
        )
    try:
        fmt = document["format"]
        if fmt not in ("onnx", "torchscript"):
            raise ValueError(f"format must be onnx or torchscript, got {fmt!r}")
        channels = tuple(
            InputChannel(name=str(c["name"]), modality=str(c["modality"]), normalization=str(c["normalization"]))
            for c in _list(document["channels"], "channels", max_len=MAX_CHANNELS)
        )
        if not channels:
            raise ValueError("no input channels")
        recipe = _parse_recipe(_mapping(document["preprocessing"], "preprocessing"))
        window = _parse_window(_mapping(document["window"], "window"))
        output = _parse_output(_mapping(document["output"], "output"))
        infer = InferConfig.model_validate(_mapping(document["infer_defaults"], "infer_defaults"))
        networks = _int(document.get("networks", 1), "networks", 1, 1000)
        src = _mapping(document.get("source", {}), "source")
        exporter = {str(k): str(v) for k, v in _mapping(document.get("exporter", {}), "exporter").items()}
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:3])
        raise ModelError(f"{source}: not a medseg export: invalid metadata ({detail})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else " ".join(str(exc).split())
        raise ModelError(f"{source}: not a medseg export: invalid metadata ({what})") from None
    if isinstance(recipe, PlanRecipe):
        plan = recipe.plan
        if len(plan.channels) != len(channels) or tuple(plan.patch_size) != window.patch_size:
            raise ModelError(f"{source}: not a medseg export: invalid metadata (plan and channels/window disagree)")
        if dict(plan.labels) != output.labels:
            raise ModelError(f"{source}: not a medseg export: invalid metadata (plan and output labels disagree)")
    elif len(recipe.normalization) != len(channels):
        raise ModelError(f"{source}: not a medseg export: invalid metadata (normalization and channels disagree)")
    return ExportMetadata(
        format=fmt,
        channels=channels,
        preprocessing=recipe,
        window=window,
        output=output,
        infer_defaults=infer,
        networks=networks,
        source=src,
        exporter=exporter,
    )


# ------------------------------------------------------------------------------ reading files
def check_model_file(path: Path) -> int:
    """The size of a readable regular model file within :attr:`~medseg.io.limits.ReadLimits.max_model_bytes`.

    Raises:
        ModelError: Missing, special or unreadable file, or larger than the limit.
    """
    from medseg.io.limits import format_bytes, get_read_limits
    from medseg.io.paths import require_readable_file

    try:
        require_readable_file(path, what="model file")
    except MedsegError as exc:
        raise ModelError(str(exc)) from None
    limit = get_read_limits().max_model_bytes
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > limit:
        raise ModelError(f"{path}: {format_bytes(size)} is larger than the model file limit {format_bytes(limit)}")
    return size


def read_model_bytes(path: Path) -> bytes:
    """The bytes of a model file (checked by :func:`check_model_file` first)."""
    check_model_file(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _parse_json(path: Path, text: str | bytes) -> Any:
    from medseg.io.safe_yaml import load_json_text

    try:
        return load_json_text(text, source=str(path), what="medseg export metadata")
    except ConfigError as exc:
        raise ModelError(f"not a medseg export: {exc}") from None


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def _onnx_tensors(graph: Any) -> Any:
    """Every tensor of an ONNX graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_tensors(sub)


def onnx_model_proto(path: Path, data: bytes) -> Any:
    """The parsed ONNX ``ModelProto`` of ``data`` (no external data allowed)."""
    onnx, _ = require_onnx(f"{path}: an ONNX model")
    from onnx.external_data_helper import uses_external_data

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and friends for truncated / foreign bytes
        raise ModelError(f"{path}: not a medseg export: not a readable ONNX model ({first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError(f"{path}: not a medseg export: not an ONNX model (no graph)")
    if any(uses_external_data(t) for t in _onnx_tensors(model.graph)):
        raise ModelError(f"{path}: not a medseg export: the ONNX model refers to external data files (refused)")
    return model


def _onnx_metadata(path: Path, model: Any) -> ExportMetadata:
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ModelError(
            f"{path}: not a medseg export: the ONNX model has no '{METADATA_KEY}' metadata "
            "(write ONNX models for medseg with medseg export)"
        )
    meta = parse_metadata(_parse_json(path, props[METADATA_KEY]), source=str(path))
    if meta.format != "onnx":
        raise ModelError(f"{path}: not a medseg export: the metadata says {meta.format}, the file is ONNX")
    return meta


def _torchscript_document(path: Path) -> Any:
    """The metadata document of a TorchScript archive, read with :mod:`zipfile` (nothing loaded)."""
    from medseg.io.limits import get_read_limits

    try:
        if not zipfile.is_zipfile(path):
            raise ModelError(f"{path}: not a medseg export: not a TorchScript archive (not a zip file)")
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            meta = [
                i for i in infos if i.filename.count("/") == 2 and i.filename.endswith(f"/extra/{TORCHSCRIPT_EXTRA}")
            ]
            if not meta:
                code = any(i.filename.count("/") == 2 and "/code/" in i.filename for i in infos)
                hint = (
                    "a TorchScript file not written by medseg export"
                    if code
                    else "a PyTorch weights file, not an exported model: pass the model directory instead"
                )
                raise ModelError(f"{path}: not a medseg export ({hint}; no extra/{TORCHSCRIPT_EXTRA})")
            info = meta[0]
            limit = get_read_limits().max_yaml_bytes
            if info.file_size > limit:
                raise ModelError(f"{path}: not a medseg export: metadata of {info.file_size} bytes is too large")
            with archive.open(info) as fh:
                data = fh.read(limit + 1)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: not a medseg export: unreadable TorchScript archive ({first_line(exc)})") from None
    return _parse_json(path, data)


def read_metadata(path: Path) -> ExportMetadata:
    """The validated metadata of an exported file, without building its network.

    Raises:
        ModelError: ``not a medseg export`` (see the module docstring), or a missing ``medseg[onnx]`` extra.
    """
    fmt = export_format(path)
    if fmt == "onnx":
        require_onnx(f"{path}: an ONNX model")
        return _onnx_metadata(path, onnx_model_proto(path, read_model_bytes(path)))
    if fmt == "torchscript":
        check_model_file(path)
        meta = parse_metadata(_torchscript_document(path), source=str(path))
        if meta.format != "torchscript":
            raise ModelError(f"{path}: not a medseg export: the metadata says {meta.format}, the file is TorchScript")
        return meta
    raise ModelError(f"{path}: not a medseg export (expected .onnx, .pt or .ts)")


# ------------------------------------------------------------------------------ the adapter
class ExportedModel(ModelAdapter):
    """A file written by ``medseg export`` (ONNX or TorchScript).

    Args:
        path: The ``.onnx`` / ``.pt`` / ``.ts`` file.

    Raises:
        ModelError: ``not a medseg export`` for foreign, truncated or tampered files; a missing extra.
    """

    kind = "exported"

    def __init__(self, path: Path) -> None:
        super().__init__(Path(path))
        self.meta = read_metadata(self.path)

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """A file named ``*.onnx``, ``*.pt`` or ``*.ts``."""
        return export_format(path) is not None and path.is_file()

    @property
    def channels(self) -> tuple[InputChannel, ...]:
        """The source's channels."""
        return self.meta.channels

    @property
    def output(self) -> OutputDecoding:
        """The source's output decoding."""
        return self.meta.output

    @property
    def window(self) -> WindowSettings:
        """The source's window settings (the graph's input is one patch)."""
        return self.meta.window

    @property
    def preprocessing(self) -> PlanRecipe | NnUNetRecipe:
        """The source's recipe."""
        return self.meta.preprocessing

    @property
    def infer_defaults(self) -> InferConfig:
        """The source's inference defaults (precision ``fp32`` for ONNX: see :attr:`float32_only`)."""
        if self.meta.format == "onnx":
            return self.meta.infer_defaults.model_copy(update={"precision": "fp32"})
        return self.meta.infer_defaults

    @property
    def float32_only(self) -> str | None:
        """ONNX graphs run in float32 (ONNX Runtime); TorchScript runs at any precision."""
        return "ONNX Runtime runs the exported graph in float32" if self.meta.format == "onnx" else None

    def _load_networks(self) -> list[nn.Module]:
        from medseg.models.adapters.runtime import onnx_network, torchscript_network

        if self.meta.format == "onnx":
            return [onnx_network(self.path, self.meta)]
        return [torchscript_network(self.path, self.meta)]

    def fingerprint(self) -> str:
        """SHA-256 of the file."""
        return hash_files([self.path])

    def describe(self) -> dict[str, Any]:
        """Format, channels, labels, patch, spacing, recipe, folds in the graph and the source model."""
        meta = self.meta
        recipe = meta.preprocessing
        spacing = list(recipe.plan.target_spacing) if isinstance(recipe, PlanRecipe) else list(recipe.spacing)
        out: dict[str, Any] = {
            "path": str(self.path.resolve()),
            "format": "ONNX export" if meta.format == "onnx" else "TorchScript export",
            "runtime": "onnxruntime (float32, CPU)" if meta.format == "onnx" else "torch.jit",
            "channels": [c.__dict__ for c in meta.channels],
            "labels": meta.output.labels,
            "target_spacing": spacing,
            "patch_size": list(meta.window.patch_size),
            "preprocessing": "medseg plan"
            if isinstance(recipe, PlanRecipe)
            else f"nnU-Net {recipe.configuration} ({recipe.reader})",
            "tiling": meta.window.tiling,
            "networks": 1,
            "folds_in_graph": meta.networks,
            "source_format": meta.source.get("format"),
            "source_path": meta.source.get("path"),
            "source_fingerprint": meta.source.get("fingerprint"),
            "exported_with": ", ".join(f"{k} {v}" for k, v in meta.exporter.items()) or None,
        }
        if meta.output.kind == "regions":
            out["regions"] = [list(r) for r in meta.output.regions]
            out["regions_class_order"] = list(meta.output.regions_class_order)
        return out
