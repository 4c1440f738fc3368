"""nnU-Net v2 results folders as a :class:`~medseg.models.adapters.base.ModelAdapter`.

A folder ``DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holds ``dataset.json`` (channels,
labels, regions), ``plans.json`` (per configuration: spacing, patch, normalisation, resampling
functions, network architecture; transpose, intensity statistics) and ``fold_<f>/checkpoint_final.pth``
(and ``checkpoint_best.pth``).  What nnU-Net's predictor does with them is reproduced without importing
nnU-Net:

* the network is built from the plans' ``architecture`` with ``dynamic-network-architectures`` (the package
  nnU-Net uses): ``PlainConvUNet``, ``ResidualEncoderUNet`` (the ResEnc M/L/XL presets) and
  ``ResidualUNet``; every class named in the plans (network, conv/norm/activation/dropout ops, residual
  blocks) is looked up in a fixed table, never imported by name;
* checkpoints load with ``torch.load(weights_only=True)`` allowing only the NumPy scalar/array/dtype
  globals that nnU-Net's trainer pickles into its logs; anything else (a pickle that would run code) is
  refused with a :class:`~medseg.errors.ModelError` before it runs;
* the preprocessing and export steps are described by :class:`NnUNetRecipe` (reader axis order,
  ``transpose_forward``/``backward``, crop to non-zero, normalisation per channel with the plans'
  foreground intensity properties and ``use_mask_for_norm``, target spacing, resampling functions and
  their kwargs), which :mod:`medseg.infer.nnunet` executes; windows use nnU-Net's tiling.

Not supported (clear errors): cascaded configurations (``3d_cascade_fullres``: they need the low-res
prediction as an extra input), custom preprocessors, label managers, readers other than SimpleITK/nibabel,
network classes outside the table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import ModelError
from medseg.models.adapters.base import (
    Checkpoint,
    InputChannel,
    ModelAdapter,
    OutputDecoding,
    WindowSettings,
    hash_files,
)

if TYPE_CHECKING:
    from torch import nn

    from medseg.config import InferConfig

__all__ = ["NnUNetChannelNorm", "NnUNetFolder", "NnUNetRecipe", "build_network", "load_checkpoint"]

#: JSON files larger than this are refused (plans/dataset files are kilobytes).
MAX_JSON_BYTES = 64 * 2**20

#: Readers whose array axis order medseg reproduces (nnU-Net's ``image_reader_writer``).
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient", "SimpleITKIOWithReorient")

#: Normalisation schemes of nnU-Net's DefaultPreprocessor.
NORMALIZATIONS = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)

#: Resampling functions (``resampling_fn_data`` / ``resampling_fn_probabilities``) medseg reproduces.
RESAMPLING = ("resample_data_or_seg_to_shape", "resample_torch_fornnunet", "no_resampling_hack")

_FOLDER_RE = re.compile(r"^(?P<trainer>.+?)__(?P<plans>.+?)__(?P<configuration>.+)$")
_FOLD_RE = re.compile(r"^fold_(?P<fold>\d+|all)$")


@dataclass(frozen=True)
class NnUNetChannelNorm:
    """Normalisation of one input channel (nnU-Net's ``normalization_schemes`` entry and statistics)."""

    scheme: str
    use_mask: bool
    mean: float | None = None
    std: float | None = None
    percentile_00_5: float | None = None
    percentile_99_5: float | None = None


@dataclass(frozen=True)
class NnUNetRecipe:
    """nnU-Net's preprocessing and export for one configuration (serialisable: :meth:`to_dict`).

    Attributes:
        configuration: ``3d_fullres``, ``3d_lowres``, ``2d`` ...
        reader: The plans' ``image_reader_writer``: decides the array axis order of the input.
        transpose_forward: Axis permutation applied after reading (``transpose_backward`` undoes it).
        transpose_backward: Inverse of ``transpose_forward``.
        spacing: Target spacing of the configuration in the transposed axis order (2 entries for ``2d``:
            the slice axis keeps its spacing).
        normalization: One entry per input channel.
        resampling_data: ``(function name, kwargs as sorted items)`` for the image.
        resampling_probabilities: The same for the logits on the way back.
    """

    configuration: str
    reader: str
    transpose_forward: tuple[int, int, int]
    transpose_backward: tuple[int, int, int]
    spacing: tuple[float, ...]
    normalization: tuple[NnUNetChannelNorm, ...]
    resampling_data: tuple[str, tuple[tuple[str, Any], ...]]
    resampling_probabilities: tuple[str, tuple[tuple[str, Any], ...]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for exported models and ``medseg info``)."""
        d = asdict(self)
        d["resampling_data"] = {"name": self.resampling_data[0], "kwargs": dict(self.resampling_data[1])}
        d["resampling_probabilities"] = {
            "name": self.resampling_probabilities[0],
            "kwargs": dict(self.resampling_probabilities[1]),
        }
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NnUNetRecipe:
        """Inverse of :meth:`to_dict`."""

        def fn(entry: dict[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]]:
            return str(entry["name"]), tuple(sorted(dict(entry.get("kwargs") or {}).items()))

        return cls(
            configuration=str(data["configuration"]),
            reader=str(data["reader"]),
            transpose_forward=tuple(int(v) for v in data["transpose_forward"]),  # type: ignore[arg-type]
            transpose_backward=tuple(int(v) for v in data["transpose_backward"]),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in data["spacing"]),
            normalization=tuple(NnUNetChannelNorm(**n) for n in data["normalization"]),
            resampling_data=fn(data["resampling_data"]),
            resampling_probabilities=fn(data["resampling_probabilities"]),
        )


# ------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"{path}: missing (an nnU-Net model folder needs dataset.json and plans.json)")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ModelError(f"{path}: {size} bytes is too large for an nnU-Net JSON file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from exc


def _resolve_configuration(plans: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The configuration with ``inherits_from`` resolved (as nnU-Net's PlansManager)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict):
        raise ModelError(f"{path}: no 'configurations' mapping")
    chain: list[str] = []
    current = name
    while True:
        if current not in configurations:
            raise ModelError(
                f"{path}: configuration {current!r} not found (have {', '.join(map(str, configurations))})"
            )
        if current in chain:
            raise ModelError(f"{path}: circular 'inherits_from' in configurations {[*chain, current]}")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        current = str(parent)
    resolved: dict[str, Any] = {}
    for item in reversed(chain):
        resolved.update(configurations[item])
    return resolved


def _labels(dataset: dict[str, Any], path: Path) -> OutputDecoding:
    """dataset.json labels -> :class:`OutputDecoding` (nnU-Net's LabelManager rules)."""
    raw = dataset.get("labels")
    if not isinstance(raw, dict) or "background" not in raw:
        raise ModelError(f"{path}: 'labels' must be a mapping with 'background' (0)")
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in raw.values())
    entries = {k: v for k, v in raw.items() if k != "ignore"}

    def values(v: Any) -> tuple[int, ...]:
        items = v if isinstance(v, (list, tuple)) else [v]
        if not items or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise ModelError(f"{path}: cannot interpret label entry {v!r}")
        return tuple(int(i) for i in items)

    if not has_regions:
        names: dict[int, str] = {}
        for key, v in entries.items():
            for value in values(v):
                names.setdefault(value, str(key))
        if sorted(names) != list(range(len(names))):
            raise ModelError(f"{path}: labels must be consecutive 0..K-1, got {sorted(names)}")
        return OutputDecoding(labels=dict(sorted(names.items())))
    order = dataset.get("regions_class_order")
    regions = [(str(k), values(v)) for k, v in entries.items() if set(values(v)) != {0}]
    if not isinstance(order, list) or len(order) != len(regions):
        raise ModelError(f"{path}: region-based labels need 'regions_class_order' with {len(regions)} entries")
    order_values = tuple(values(order))
    names = {0: "background"}
    for (name, _), value in zip(regions, order_values, strict=True):
        names[value] = name
    return OutputDecoding(
        labels=dict(sorted(names.items())),
        kind="regions",
        regions=tuple(r for _, r in regions),
        regions_class_order=order_values,
    )


# --------------------------------------------------------------------------------- the network
def _op_table() -> dict[str, Any]:
    from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
    from torch import nn

    ops: dict[str, Any] = {}
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.GroupNorm,
        nn.LeakyReLU,
        nn.ReLU,
        nn.PReLU,
        nn.GELU,
        nn.ELU,
        nn.Dropout,
        nn.Dropout2d,
        nn.Dropout3d,
    ):
        ops[cls.__name__] = cls
    ops["BasicBlockD"] = BasicBlockD
    ops["BottleneckD"] = BottleneckD
    return ops


def _network_classes() -> dict[str, Any]:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet, ResidualUNet

    return {"PlainConvUNet": PlainConvUNet, "ResidualEncoderUNet": ResidualEncoderUNet, "ResidualUNet": ResidualUNet}


SUPPORTED_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")


def _network_name(architecture: dict[str, Any], path: Path) -> str:
    full = str(architecture.get("network_class_name", ""))
    name = full.rsplit(".", 1)[-1]
    if name not in SUPPORTED_NETWORKS or not (full == name or full.startswith("dynamic_network_architectures.")):
        raise ModelError(
            f"{path}: network class {full or '(none)'!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_NETWORKS)} from dynamic_network_architectures)"
        )
    return name


def build_network(architecture: dict[str, Any], *, in_channels: int, out_channels: int, path: Path) -> nn.Module:
    """The network a plans ``architecture`` entry describes (deep supervision off, no init).

    Raises:
        ModelError: Unknown network class or op, or arguments the class does not accept.
    """
    name = _network_name(architecture, path)
    kwargs = dict(architecture.get("arch_kwargs") or {})
    table = _op_table()
    for key in architecture.get("_kw_requires_import") or []:
        value = kwargs.get(key)
        if value is None:
            continue
        short = str(value).rsplit(".", 1)[-1]
        prefix_ok = str(value).startswith(("torch.nn.", "dynamic_network_architectures.")) or str(value) == short
        if short not in table or not prefix_ok:
            raise ModelError(f"{path}: {key} {value!r} is not supported (known: {', '.join(sorted(table))})")
        kwargs[key] = table[short]
    kwargs["deep_supervision"] = False
    try:
        return _network_classes()[name](input_channels=in_channels, num_classes=out_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot build {name} from the plans ({exc})") from exc


def _slice_network(net: nn.Module) -> nn.Module:
    """A 2D network as a module on ``(n, C, 1, y, x)`` windows (one slice each)."""
    from torch import nn as tnn

    class _SliceNetwork(tnn.Module):
        def __init__(self, inner: tnn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return self.inner(x[:, :, 0])[:, :, None]

    return _SliceNetwork(net)


# --------------------------------------------------------------------------------- checkpoints
def _safe_globals() -> list[Any]:
    """What nnU-Net's trainer pickles besides tensors: NumPy scalars/arrays/dtypes in its logs."""
    import numpy as np

    multiarray = np._core.multiarray  # type: ignore[attr-defined]
    allowed: list[Any] = [np.dtype, np.ndarray]
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(multiarray.scalar, f"{name}.scalar"), (multiarray._reconstruct, f"{name}._reconstruct")]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with only NumPy's data globals allowed.

    Raises:
        ModelError: Missing/unreadable file, or a pickle that needs anything else (it is not run).
    """
    import pickle

    import torch

    from medseg.models.safe_load import safe_reason

    if not path.is_file():
        raise ModelError(f"{path}: checkpoint missing")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path}: refused: the checkpoint contains objects that would run code when loaded ({safe_reason(exc)})"
        ) from None
    except Exception as exc:  # torch raises many types for corrupt archives (IndexError for an empty file ...)
        raise ModelError(f"{path}: cannot read the checkpoint ({safe_reason(exc)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


# ------------------------------------------------------------------------------------- adapter
class NnUNetFolder(ModelAdapter):
    """An nnU-Net v2 results folder (one configuration, one or more folds).

    Args:
        path: ``.../DatasetXXX_Name/<Trainer>__<Plans>__<configuration>``.
        folds: Fold names (``"0"``, ``"all"``); ``None``: every numbered fold with the checkpoint, else
            ``fold_all``.
        checkpoint: ``final`` or ``best``.

    Raises:
        ModelError: Missing or invalid dataset.json/plans.json, missing folds, unsupported configuration.
    """

    kind = "nnunet"

    def __init__(self, path: Path, *, folds: tuple[str, ...] | None = None, checkpoint: Checkpoint = "final"):
        super().__init__(Path(path))
        p = self.path
        if not p.is_dir():
            raise ModelError(f"{p}: model folder not found")
        self.checkpoint_name = f"checkpoint_{checkpoint}.pth"
        self.dataset = _read_json(p / "dataset.json")
        self.plans = _read_json(p / "plans.json")
        if not isinstance(self.dataset, dict) or not isinstance(self.plans, dict):
            raise ModelError(f"{p}: dataset.json and plans.json must be JSON objects")
        match = _FOLDER_RE.match(p.name)
        self.trainer = match["trainer"] if match else None
        self.folds = self._find_folds(folds)
        self._meta: dict[str, Any] | None = None
        configuration = match["configuration"] if match else str(self._checkpoint_meta()["configuration"])
        self.configuration_name = configuration
        self.config = _resolve_configuration(self.plans, configuration, p / "plans.json")
        self._validate()
        self.decoding = _labels(self.dataset, p / "dataset.json")

    @classmethod
    def open(
        cls, path: Path, *, folds: tuple[str, ...] | None = None, checkpoint: Checkpoint = "final"
    ) -> NnUNetFolder:
        """Open with a fold selection and checkpoint."""
        return cls(path, folds=folds, checkpoint=checkpoint)

    @classmethod
    def recognises(cls, path: Path) -> bool:
        """A directory with plans.json or fold_* folders (dataset.json alone is a raw dataset)."""
        if not path.is_dir():
            return False
        if (path / "plans.json").exists():
            return True
        return any(_FOLD_RE.match(c.name) for c in path.iterdir() if c.is_dir())

    # ----------------------------------------------------------------- folder contents
    def _find_folds(self, folds: tuple[str, ...] | None) -> tuple[str, ...]:
        p = self.path
        if folds is not None:
            missing = [f for f in folds if not (p / f"fold_{f}" / self.checkpoint_name).is_file()]
            if missing:
                names = ", ".join(f"fold_{f}/{self.checkpoint_name}" for f in missing)
                raise ModelError(f"{p}: missing {names}")
            return folds
        found = sorted(
            (m["fold"] for c in p.iterdir() if c.is_dir() and (m := _FOLD_RE.match(c.name))),
            key=lambda f: (f == "all", int(f) if f.isdigit() else 0),
        )
        numbered = [f for f in found if f != "all" and (p / f"fold_{f}" / self.checkpoint_name).is_file()]
        if numbered:
            return tuple(numbered)
        if "all" in found and (p / "fold_all" / self.checkpoint_name).is_file():
            return ("all",)
        raise ModelError(f"{p}: no fold_*/{self.checkpoint_name} found")

    def _checkpoint_path(self, fold: str) -> Path:
        return self.path / f"fold_{fold}" / self.checkpoint_name

    def _validate(self) -> None:
        plans_path = self.path / "plans.json"
        config = self.config
        if config.get("previous_stage"):
            raise ModelError(
                f"{plans_path}: configuration {self.configuration_name!r} is a cascade stage (needs the "
                f"{config['previous_stage']!r} prediction as input); cascades are not supported"
            )
        for key in ("patch_size", "spacing", "normalization_schemes", "use_mask_for_norm", "architecture"):
            if key not in config:
                raise ModelError(f"{plans_path}: configuration {self.configuration_name!r} has no {key!r}")
        if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
            raise ModelError(f"{plans_path}: preprocessor {config['preprocessor_name']!r} is not supported")
        if self.plans.get("label_manager", "LabelManager") != "LabelManager":
            raise ModelError(f"{plans_path}: label manager {self.plans['label_manager']!r} is not supported")
        reader = self.plans.get("image_reader_writer", "SimpleITKIO")
        if reader not in READERS:
            raise ModelError(f"{plans_path}: image reader {reader!r} is not supported ({', '.join(READERS)})")
        for scheme in config["normalization_schemes"]:
            if scheme not in NORMALIZATIONS:
                raise ModelError(f"{plans_path}: normalization {scheme!r} is not supported")
        for key in ("resampling_fn_data", "resampling_fn_probabilities"):
            name = config.get(key, "resample_data_or_seg_to_shape")
            if name not in RESAMPLING:
                raise ModelError(f"{plans_path}: {key} {name!r} is not supported ({', '.join(RESAMPLING)})")
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        if not isinstance(names, dict) or not names:
            raise ModelError(f"{self.path / 'dataset.json'}: no 'channel_names'")
        if len(names) != len(config["normalization_schemes"]):
            raise ModelError(
                f"{plans_path}: {len(config['normalization_schemes'])} normalization scheme(s) for "
                f"{len(names)} channel(s) in dataset.json"
            )
        patch = config["patch_size"]
        if len(patch) not in (2, 3) or len(config["spacing"]) != len(patch):
            raise ModelError(f"{plans_path}: patch_size {patch} and spacing {config['spacing']} do not match")
        transpose = self.plans.get("transpose_forward", [0, 1, 2])
        if sorted(transpose) != [0, 1, 2]:
            raise ModelError(f"{plans_path}: transpose_forward {transpose} is not a permutation of 0, 1, 2")
        _network_name(config["architecture"], plans_path)

    def _checkpoint_meta(self) -> dict[str, Any]:
        """Trainer, configuration and mirroring axes of the first fold's checkpoint (loaded once)."""
        if self._meta is None:
            path = self._checkpoint_path(self.folds[0])
            ck = load_checkpoint(path)
            init_args = ck.get("init_args")
            init: dict[str, Any] = init_args if isinstance(init_args, dict) else {}
            axes = ck.get("inference_allowed_mirroring_axes")
            self._meta = {
                "trainer": ck.get("trainer_name"),
                "configuration": init.get("configuration"),
                "mirror_axes": tuple(int(a) for a in axes) if axes is not None else (),
                "first": (path, ck["network_weights"]),
            }
        return self._meta

    # ----------------------------------------------------------------- what the model decides
    @property
    def channels(self) -> tuple[InputChannel, ...]:
        """dataset.json ``channel_names`` with the plans' normalisation."""
        names = self.dataset.get("channel_names", self.dataset.get("modality"))
        out = []
        for i, scheme in enumerate(self.config["normalization_schemes"]):
            name = str(names.get(str(i), names.get(i, f"channel_{i}")))
            modality = "CT" if scheme == "CTNormalization" or name.upper() == "CT" else "MR"
            if name.upper() in ("PET", "PT", "US", "RGB") or scheme == "RGBTo01Normalization":
                modality = "other"
            out.append(InputChannel(name=name, modality=modality, normalization=scheme))
        return tuple(out)

    @property
    def output(self) -> OutputDecoding:
        """Softmax over dataset.json labels, or nnU-Net's region decoding."""
        return self.decoding

    @property
    def spatial_dims(self) -> int:
        """2 for a ``2d`` configuration."""
        return len(self.config["patch_size"])

    @property
    def window(self) -> WindowSettings:
        """nnU-Net tiling with the configuration's patch and the checkpoint's mirroring axes."""
        patch = [int(v) for v in self.config["patch_size"]]
        axes = self._checkpoint_meta()["mirror_axes"]
        if self.spatial_dims == 2:
            return WindowSettings(
                patch_size=(1, patch[0], patch[1]),
                tiling="nnunet",
                allowed_mirror_axes=tuple(a + 1 for a in axes),
                spatial_dims=2,
            )
        return WindowSettings(patch_size=(patch[0], patch[1], patch[2]), tiling="nnunet", allowed_mirror_axes=axes)

    @property
    def preprocessing(self) -> NnUNetRecipe:
        """The plans' preprocessing and export for this configuration."""
        config = self.config
        props = self.plans.get("foreground_intensity_properties_per_channel") or self.plans.get(
            "foreground_intensity_properties_by_modality", {}
        )
        norms = []
        for i, (scheme, use_mask) in enumerate(
            zip(config["normalization_schemes"], config["use_mask_for_norm"], strict=True)
        ):
            p = props.get(str(i), {}) if isinstance(props, dict) else {}
            if scheme == "CTNormalization" and not all(
                k in p for k in ("mean", "std", "percentile_00_5", "percentile_99_5")
            ):
                raise ModelError(
                    f"{self.path / 'plans.json'}: CTNormalization of channel {i} needs intensity properties"
                )
            norms.append(
                NnUNetChannelNorm(
                    scheme=str(scheme),
                    use_mask=bool(use_mask),
                    mean=p.get("mean"),
                    std=p.get("std"),
                    percentile_00_5=p.get("percentile_00_5"),
                    percentile_99_5=p.get("percentile_99_5"),
                )
            )

        def fn(key: str) -> tuple[str, tuple[tuple[str, Any], ...]]:
            kwargs = config.get(f"{key}_kwargs") or {}
            return str(config.get(key, "resample_data_or_seg_to_shape")), tuple(sorted(kwargs.items()))

        forward = tuple(int(v) for v in self.plans.get("transpose_forward", [0, 1, 2]))
        backward = tuple(int(v) for v in self.plans.get("transpose_backward", [forward.index(i) for i in range(3)]))
        return NnUNetRecipe(
            configuration=self.configuration_name,
            reader=str(self.plans.get("image_reader_writer", "SimpleITKIO")),
            transpose_forward=forward,  # type: ignore[arg-type]
            transpose_backward=backward,  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in config["spacing"]),
            normalization=tuple(norms),
            resampling_data=fn("resampling_fn_data"),
            resampling_probabilities=fn("resampling_fn_probabilities"),
        )

    @property
    def infer_defaults(self) -> InferConfig:
        """nnU-Net's predictor defaults: step 0.5, Gaussian, mirroring on allowed axes.

        Windows that see only air are skipped (``body_crop="windows"``, :class:`medseg.infer.nnunet.BodyWindows`):
        the labels of body voxels are unchanged; ``body_crop="none"`` runs every window as nnU-Net does.
        """
        from medseg.config import InferConfig

        return InferConfig(
            overlap=0.5,
            blend="gaussian",
            mirror_axes=self.window.allowed_mirror_axes,
            body_crop="windows",
        )

    def _load_networks(self) -> list[nn.Module]:
        meta = self._checkpoint_meta()
        if meta["configuration"] is not None and meta["configuration"] != self.configuration_name:
            raise ModelError(
                f"{self._checkpoint_path(self.folds[0])}: trained for configuration {meta['configuration']!r}, "
                f"the folder is {self.configuration_name!r}"
            )
        first_path, first_weights = meta.pop("first", (None, None))
        networks = []
        for fold in self.folds:
            path = self._checkpoint_path(fold)
            weights = first_weights if path == first_path else load_checkpoint(path)["network_weights"]
            net = build_network(
                self.config["architecture"],
                in_channels=self.num_channels,
                out_channels=self.decoding.num_outputs,
                path=self.path / "plans.json",
            )
            state = {_strip_prefix(k): v for k, v in weights.items()}
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                detail = " ".join(str(exc).split())[:300]
                raise ModelError(f"{path}: weights do not match the network in plans.json ({detail})") from None
            net.eval()
            networks.append(_slice_network(net) if self.spatial_dims == 2 else net)
        return networks

    def fingerprint(self) -> str:
        """SHA-256 of plans.json, dataset.json and the selected checkpoints (+ fold/checkpoint choice)."""
        files = [self.path / "plans.json", self.path / "dataset.json", *(self._checkpoint_path(f) for f in self.folds)]
        return hash_files(files, extra=[",".join(self.folds), self.checkpoint_name, self.configuration_name])

    def describe(self) -> dict[str, Any]:
        """Dataset, trainer, plans, configuration, folds, channels, labels, spacing, patch, network."""
        recipe = self.preprocessing
        out: dict[str, Any] = {
            "path": str(self.path.resolve()),
            "format": "nnU-Net v2 results folder",
            "dataset": self.plans.get("dataset_name"),
            "trainer": self.trainer,
            "plans": self.plans.get("plans_name"),
            "configuration": self.configuration_name,
            "folds": list(self.folds),
            "checkpoint": self.checkpoint_name,
            "channels": [c.__dict__ for c in self.channels],
            "labels": self.decoding.labels,
            "target_spacing": list(recipe.spacing),
            "patch_size": [int(v) for v in self.config["patch_size"]],
            "network": str(self.config["architecture"].get("network_class_name")),
            "transpose_forward": list(recipe.transpose_forward),
            "reader": recipe.reader,
            "networks": len(self.folds),
        }
        if self.decoding.kind == "regions":
            out["regions"] = [list(r) for r in self.decoding.regions]
            out["regions_class_order"] = list(self.decoding.regions_class_order)
        return out


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key
