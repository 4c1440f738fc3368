"""Sliding-window prediction with any model, with outputs on the input grid.

Models come through the model seam (:func:`medseg.models.adapters.open_model`): the predictor runs the
pipeline registered for the model's preprocessing recipe (:data:`PIPELINES`): :class:`PlanPipeline` for
medseg's plans (below), :class:`~medseg.infer.nnunet.NnUNetPipeline` for nnU-Net's.  Windows, mirroring,
ensembling, precision and post-processing are shared.

For a medseg plan the input is preprocessed exactly as in training (orientation, spacing, normalisation
from the plan); windows that do not touch the body's box are skipped; the networks (one model, or several
folds/models ensembled) run window by window with Gaussian blending, optional mirroring
and reduced precision where the hardware has it: bf16 weights in channels-last on CPUs with
AVX-512 BF16/AMX, AMP on CUDA (:mod:`medseg.infer.sliding_window`, :mod:`medseg.infer.fastnet`).  Blended
logits stream out slab by slab; they are either reduced to labels on the fly (when the
input grid is the network grid up to flips/permutations) or kept in float16 and
resampled onto the input grid chunk by chunk (:mod:`medseg.infer.resample`).  The label
volume has the input's shape, spacing, origin and direction exactly (the geometry is
copied from the input, not recomputed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor

from medseg.config import InferConfig
from medseg.data.plan import Plan
from medseg.data.transforms import stack_channels
from medseg.errors import ConfigError, ModelError, reraise_medseg
from medseg.infer.crop import body_box, box_on_grid
from medseg.infer.nnunet import NnUNetPipeline
from medseg.infer.postprocess import PostprocessOptions, postprocess_labels
from medseg.infer.preprocess import inference_preprocess
from medseg.infer.resample import index_map, resample_to_grid
from medseg.infer.sliding_window import (
    WindowPredictor,
    choose_stitch_device,
    choose_stream_axis,
    class_argmax,
    iter_logit_slabs,
    mirror_combinations,
    slab_buffer_bytes,
    sliding_window_predict,
    windows_touching,
)
from medseg.io import Geometry, Volume, label_dtype, load_volume
from medseg.models.adapters import ModelAdapter, NnUNetRecipe, PlanRecipe, open_model
from medseg.models.adapters.medseg_dir import MedsegModelDir
from medseg.models.device import resolve_device, resolve_precision, use_channels_last
from medseg.models.package import LoadedModel
from medseg.types import PathLike

__all__ = ["PIPELINES", "CasePrediction", "PlanPipeline", "Predictor", "ProbabilityDtype", "mirror_combinations"]

log = logging.getLogger(__name__)

#: How probabilities are stored: ``uint8``/``uint16`` scaled to the dtype's maximum, or ``float32``.
ProbabilityDtype = Literal["uint8", "uint16", "float32"]


@dataclass
class CasePrediction:
    """Everything predicted for one case.

    Attributes:
        labels: ``(1, X, Y, Z)`` label volume on the input grid.
        probabilities: ``(K, X, Y, Z)`` class probabilities on the input grid (``uint8`` /
            ``uint16`` scaled so that the dtype maximum is 1, or ``float32``), if asked for.
        timings: Seconds per stage (``preprocess_s``, ``network_s``, ``forward_s``,
            ``resample_s``, ``postprocess_s``) and ``windows``.
    """

    labels: Volume
    probabilities: Volume | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _adapter(model: PathLike | LoadedModel | ModelAdapter) -> ModelAdapter:
    if isinstance(model, LoadedModel):
        return MedsegModelDir.from_loaded(model)
    return open_model(model)


class PlanPipeline:
    """Runs a :class:`~medseg.models.adapters.PlanRecipe` (medseg's plan) for a :class:`Predictor`."""

    def __init__(self, adapter: ModelAdapter, predictor: Predictor) -> None:
        self.predictor = predictor

    def run(
        self, channels: Sequence[Volume], probabilities: ProbabilityDtype | None
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        """Labels ``(X, Y, Z)`` (and probabilities) on the input grid, plus timings."""
        return self.predictor._plan_case(stack_channels(channels), probabilities)


#: Preprocessing recipe type -> the pipeline that runs it (an exported model reuses these recipes).
PIPELINES: dict[type, Any] = {PlanRecipe: PlanPipeline, NnUNetRecipe: NnUNetPipeline}


def postprocess_options(infer: InferConfig) -> PostprocessOptions:
    """The post-processing switched on in ``infer``."""
    return PostprocessOptions(
        min_component_mm3=infer.min_component_mm3,
        keep_largest_component=infer.keep_largest_component,
        fill_holes=infer.fill_holes,
    )


class Predictor:
    """Predict label volumes with a model (or an ensemble of them).

    Args:
        model: A model (anything :func:`~medseg.models.adapters.open_model` opens: a medseg model
            directory, an nnU-Net results folder, an adapter, a loaded medseg model), or a sequence of
            them (ensembled by averaging logits; they must agree on what :meth:`ModelAdapter.check_ensemble`
            checks).
        infer: Inference settings; defaults to the (first) model's own (``config.infer`` of a medseg
            model, nnU-Net's predictor defaults for an nnU-Net folder).
        progress: Show a progress bar over windows.

    Raises:
        ModelError: A model is incomplete or the models cannot be ensembled.
        ConfigError: The device or precision asked for is not available.
    """

    def __init__(
        self,
        model: PathLike | LoadedModel | ModelAdapter | Sequence[PathLike | LoadedModel | ModelAdapter],
        *,
        infer: InferConfig | None = None,
        progress: bool = False,
    ):
        items: list[Any] = list(model) if isinstance(model, (list, tuple)) else [model]
        if not items:
            raise ModelError("no model given")
        self.adapters = [_adapter(m) for m in items]
        for other in self.adapters[1:]:
            self.adapters[0].check_ensemble(other)
        self.adapter = self.adapters[0]
        self.infer = infer or self.adapter.infer_defaults
        try:
            self.device = resolve_device(self.infer.device)
            self.dtype = resolve_precision(self.infer.precision, self.device)
        except ValueError as exc:
            raise ConfigError(f"infer settings: {exc}") from exc
        fixed = [(a, reason) for a in self.adapters if (reason := a.float32_only)]
        if fixed and self.dtype is not None:
            if self.infer.precision != "auto":
                adapter, reason = fixed[0]
                raise ConfigError(f"{adapter.path}: {reason}; use --precision fp32 or auto")
            self.dtype = None  # auto: what the model can run
        if self.infer.threads:
            torch.set_num_threads(self.infer.threads)
        self.progress = progress
        self.channels_last = use_channels_last(self.device, self.dtype)
        self.windows = WindowPredictor(
            [net for a in self.adapters for net in a.load_networks()],
            device=self.device,
            dtype=self.dtype,
            mirror_axes=self.infer.mirror_axes,
            channels_last=self.channels_last,
            batch_size=self.infer.sw_batch_size,
        )
        self.network = self.windows.originals[0]
        self.postprocess = postprocess_options(self.infer)
        recipe = self.adapter.preprocessing
        pipeline = PIPELINES.get(type(recipe))
        if pipeline is None:
            raise ModelError(f"{self.adapter.path}: no inference pipeline for {type(recipe).__name__}")
        self.pipeline = pipeline(self.adapter, self)
        self._preprocess = inference_preprocess(recipe.plan) if isinstance(recipe, PlanRecipe) else None
        self.last_timings: dict[str, float] = {}

    @property
    def models(self) -> list[LoadedModel]:
        """The loaded medseg model directories (medseg models only)."""
        return [a.loaded for a in self.adapters if isinstance(a, MedsegModelDir)]

    @property
    def model(self) -> LoadedModel:
        """The first loaded medseg model directory (medseg models only)."""
        return self.models[0]

    @property
    def plan(self) -> Plan:
        """The (shared) plan of medseg model(s)."""
        recipe = self.adapter.preprocessing
        if not isinstance(recipe, PlanRecipe):
            raise AttributeError(f"{self.adapter.path} has no medseg plan")
        return recipe.plan

    @property
    def label_names(self) -> dict[int, str]:
        """``{value: name}`` of the model's classes."""
        return self.adapter.label_names

    @property
    def num_channels(self) -> int:
        """Input channels the model(s) expect."""
        return self.adapter.num_channels

    def stitch_device(self, size: Sequence[int], roi: Sequence[int], num_outputs: int) -> torch.device:
        """Where the slab blending buffer for an image of ``size`` goes (GPU when it fits)."""
        axis = choose_stream_axis([max(s, r) for s, r in zip(size, roi, strict=True)], roi)
        need = slab_buffer_bytes(size, roi, num_outputs, axis)
        return choose_stitch_device(self.windows.device, buffer_bytes=need)

    def _stitch_device(self, size: Sequence[int]) -> torch.device:
        return self.stitch_device(size, self.plan.patch_size, self.plan.num_classes)

    def _slabs(self, image: torch.Tensor) -> Any:
        return iter_logit_slabs(
            image,
            self.windows,
            roi_size=self.plan.patch_size,
            overlap=self.infer.overlap,
            mode=self.infer.blend,
            sw_batch_size=self.infer.sw_batch_size,
            stitch_device=self._stitch_device(image.shape[1:]),
            progress=self.progress,
        )

    def _crop(
        self,
        mode: str,
        box: tuple[np.ndarray, np.ndarray] | None,
        geometry: Geometry,
        net_affine: np.ndarray,
        net_shape: tuple[int, int, int],
    ) -> tuple[slice, slice, slice] | None:
        """The network-grid region to run windows on (``None``: no body, nothing to run)."""
        if mode == "none":
            return (slice(0, net_shape[0]), slice(0, net_shape[1]), slice(0, net_shape[2]))
        if box is None:
            return None
        roi = self.plan.patch_size
        mapped = box_on_grid(
            box,
            source_affine=geometry.affine,
            grid_affine=net_affine,
            grid_shape=net_shape,
            min_size=roi if mode == "box" else (1, 1, 1),
        )
        if mode == "box":
            return mapped
        return windows_touching(mapped, net_shape, roi, overlap=self.infer.overlap)

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits on the network grid (no cropping).

        Args:
            image: ``(B, C, X, Y, Z)`` preprocessed input.

        Returns:
            ``(B, K, X, Y, Z)`` float32 logits on the same grid (CPU), averaged over mirrorings
            and ensembled models.
        """
        plain = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        return sliding_window_predict(
            plain,
            self.windows,
            roi_size=self.plan.patch_size,
            overlap=self.infer.overlap,
            mode=self.infer.blend,
            sw_batch_size=self.infer.sw_batch_size,
            stitch_device=self._stitch_device(plain.shape[2:]),
            progress=self.progress,
        )

    def preprocess(self, channels: Volume | Sequence[Volume]) -> MetaTensor:
        """Channels on one grid -> ``(C, X', Y', Z')`` MetaTensor on the plan's grid (medseg models)."""
        items = [channels] if isinstance(channels, Volume) else list(channels)
        if self._preprocess is None:
            raise ModelError(f"{self.adapter.path}: preprocess() is for medseg plans")
        with reraise_medseg():
            return self._preprocess({"image": items})["image"]

    def _check_channels(self, items: Sequence[Volume]) -> None:
        expected = self.adapter.num_channels
        for source in items:
            volumes = int(source.meta.get("num_volumes", 1) or 1)
            if volumes > 1:  # a 4D DICOM series is never mapped onto model channels implicitly
                raise ModelError(
                    f"{source.source}: series {source.meta.get('series_key') or ''} has {volumes} volumes (time "
                    "points, diffusion directions or echoes); models take one 3D volume per channel: choose one with "
                    "'<UID>#vol=<n>' (medseg info lists the volumes)"
                )
        got = sum(v.channels for v in items)
        if got != expected:
            raise ModelError(
                f"{items[0].source}: model expects {expected} channel(s) "
                f"({', '.join(c.name for c in self.adapter.channels)}), got {got}"
            )

    def predict(self, channels: Volume | Sequence[Volume]) -> Volume:
        """Segment one case.

        Args:
            channels: One volume per model input channel (or one multi-channel volume), on one grid.

        Returns:
            A label :class:`Volume` ``(1, X, Y, Z)`` with exactly the input's geometry and the
            model's label names in ``meta["label_names"]``.
        """
        return self.predict_case(channels).labels

    def predict_case(
        self, channels: Volume | Sequence[Volume], *, probabilities: ProbabilityDtype | None = None
    ) -> CasePrediction:
        """Segment one case, optionally with class probabilities on the input grid.

        Args:
            channels: One volume per model input channel (or one multi-channel volume), on one grid.
            probabilities: Also return probabilities stored as this dtype (``uint8``/``uint16``
                scaled so that the dtype maximum means 1, or ``float32``).

        Raises:
            ModelError: The number of channels does not match the model (names the file).
        """
        items = [channels] if isinstance(channels, Volume) else list(channels)
        self._check_channels(items)
        geometry, name = items[0].geometry, items[0].source
        labels, probs, timings = self.pipeline.run(items, probabilities)
        del items
        t3 = time.perf_counter()
        labels = postprocess_labels(labels, spacing=geometry.spacing, options=self.postprocess)
        self.last_timings = {**timings, "postprocess_s": round(time.perf_counter() - t3, 4)}
        meta = {"label_names": self.label_names}
        label_volume = Volume(array=labels[None], geometry=geometry, kind="label", source=name, meta=meta)
        prob_volume = None
        if probs is not None:
            prob_volume = Volume(array=probs, geometry=geometry, kind="image", source=name, meta=dict(meta))
        return CasePrediction(labels=label_volume, probabilities=prob_volume, timings=dict(self.last_timings))

    def _plan_case(
        self, source: Volume, probabilities: ProbabilityDtype | None
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        """The medseg-plan pipeline: labels (and probabilities) on the input grid, plus timings."""
        geometry = source.geometry
        t0 = time.perf_counter()
        mode = self.infer.body_crop
        box = body_box(source, self.plan) if mode != "none" else None
        image = self.preprocess(source)
        del source
        net_affine = torch.as_tensor(image.affine).detach().cpu().numpy().astype(np.float64)
        net_shape = (int(image.shape[1]), int(image.shape[2]), int(image.shape[3]))
        plain = image.as_tensor()
        del image
        t1 = time.perf_counter()
        forward_before, windows_before = self.windows.seconds, self.windows.calls
        crop = self._crop(mode, box, geometry, net_affine, net_shape)
        k = self.plan.num_classes
        mapping = index_map(geometry, net_affine) if probabilities is None else None
        probs: np.ndarray | None = None
        if crop is None:
            t2 = time.perf_counter()
            labels = np.zeros(geometry.shape, dtype=label_dtype(k - 1))
            if probabilities is not None:
                probs = _background_probabilities(k, geometry.shape, probabilities)
        elif mapping is not None:
            net_labels = np.zeros(net_shape, dtype=label_dtype(k - 1))
            for slab in self._slabs(plain[(slice(None), crop[0], crop[1], crop[2])]):
                region = list(crop)
                region[slab.axis] = slice(crop[slab.axis].start + slab.start, crop[slab.axis].start + slab.stop)
                net_labels[tuple(region)] = class_argmax(slab.logits).cpu().numpy()
            del plain
            t2 = time.perf_counter()
            labels = mapping.apply(net_labels, geometry.shape)
        else:
            store_dtype = torch.float16 if self.infer.logits_dtype == "float16" else torch.float32
            store = torch.empty((k, *(s.stop - s.start for s in crop)), dtype=store_dtype)
            for slab in self._slabs(plain[(slice(None), crop[0], crop[1], crop[2])]):
                logits = slab.logits.clamp_(-6e4, 6e4) if store_dtype == torch.float16 else slab.logits
                store.narrow(slab.axis + 1, slab.start, slab.stop - slab.start).copy_(logits)
            del plain
            t2 = time.perf_counter()
            labels, probs = resample_to_grid(
                store,
                net_affine=net_affine,
                net_shape=net_shape,
                target=geometry,
                offset=(crop[0].start, crop[1].start, crop[2].start),
                probabilities=probabilities,
            )
            del store
        t3 = time.perf_counter()
        timings = {
            "preprocess_s": round(t1 - t0, 4),
            "network_s": round(t2 - t1, 4),
            "forward_s": round(self.windows.seconds - forward_before, 4),
            "windows": self.windows.calls - windows_before,
            "resample_s": round(t3 - t2, 4),
        }
        return labels, probs, timings

    @staticmethod
    def _to_input_grid(logits: torch.Tensor, network_affine: torch.Tensor, source: Volume) -> np.ndarray:
        """Resample class probabilities onto the input grid (trilinear), then argmax.

        Args:
            logits: ``(K, X', Y', Z')`` on the network grid.
            network_affine: ``(4, 4)`` RAS affine of the network grid.
            source: The input volume whose grid the output must have.

        Returns:
            ``(X, Y, Z)`` labels with the smallest sufficient unsigned dtype.
        """
        plain = logits.as_tensor() if isinstance(logits, MetaTensor) else torch.as_tensor(logits)
        affine = np.asarray(torch.as_tensor(network_affine, dtype=torch.float64).cpu().numpy())
        shape = (int(plain.shape[1]), int(plain.shape[2]), int(plain.shape[3]))
        labels, _ = resample_to_grid(plain, net_affine=affine, net_shape=shape, target=source.geometry)
        return labels

    def predict_paths(self, inputs: Sequence[PathLike]) -> Volume:
        """Load channel files (or one DICOM folder) and predict."""
        return self.predict([load_volume(p) for p in inputs])

    def describe(self) -> dict[str, Any]:
        """Settings used, for the YAML written beside predictions."""
        paths = [str(Path(m.path).resolve()) for m in self.adapters]
        return {
            "model": paths[0] if len(paths) == 1 else paths,
            "model_info": [a.describe() for a in self.adapters],
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "fp32",
            "channels_last": self.channels_last,
            "threads": torch.get_num_threads(),
            "infer": self.infer.model_dump(mode="json"),
        }


def _background_probabilities(k: int, shape: tuple[int, int, int], dtype: ProbabilityDtype) -> np.ndarray:
    """``(K, X, Y, Z)`` probabilities of an all-background prediction."""
    np_dtype = np.dtype(dtype)
    out = np.zeros((k, *shape), dtype=np_dtype)
    out[0] = np.iinfo(np_dtype).max if np_dtype.kind == "u" else 1.0
    return out
