"""Sliding-window prediction over a model directory, with outputs on the input grid.

The input is preprocessed exactly as in training (orientation, spacing, normalisation
from the plan), the network runs window by window with Gaussian blending
(:func:`monai.inferers.sliding_window_inference`) and optional mirroring, and the class
probabilities are resampled from the network grid back onto the input's own grid
before the argmax, so the label volume has the input's shape, spacing, origin and
direction exactly (the geometry is copied from the input, not recomputed).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import SpatialResample

from medseg.config import InferConfig
from medseg.data.transforms import preprocess_transforms, stack_channels
from medseg.errors import ModelError, reraise_medseg
from medseg.io import Volume, label_dtype, load_volume
from medseg.models.device import autocast, resolve_device, resolve_precision
from medseg.models.package import LoadedModel, load_model
from medseg.types import PathLike

__all__ = ["Predictor", "mirror_combinations"]


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """All subsets of the spatial ``axes`` (the empty one first), as flip dims of a 5D tensor."""
    dims = [a + 2 for a in axes]
    return [combo for r in range(len(dims) + 1) for combo in itertools.combinations(dims, r)]


class Predictor:
    """Predict label volumes with a trained model directory.

    Args:
        model: A model directory or an already loaded model.
        infer: Inference settings; defaults to the model's own ``config.infer``.
        progress: Show a progress bar over windows.
    """

    def __init__(self, model: PathLike | LoadedModel, *, infer: InferConfig | None = None, progress: bool = False):
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.infer = infer or self.model.config.infer
        self.device = resolve_device(self.infer.device)
        self.dtype = resolve_precision(self.infer.precision, self.device)
        self.progress = progress
        self.network = self.model.network.to(self.device).eval()
        # Channels-last 3D speeds up fp32 convolutions on CPU; bf16 kernels prefer the default layout.
        self.channels_last = self.device.type == "cpu" and self.dtype is None
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self._preprocess = preprocess_transforms(self.model.plan, with_label=False)
        self.last_timings: dict[str, float] = {}

    @property
    def label_names(self) -> dict[int, str]:
        """``{value: name}`` of the model's classes."""
        return dict(self.model.plan.labels)

    def _forward(self, windows: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.dtype):
            return self.network(windows).float()

    @torch.inference_mode()
    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Logits on the network grid.

        Args:
            image: ``(B, C, X, Y, Z)`` preprocessed input.

        Returns:
            ``(B, K, X, Y, Z)`` float32 logits on the same grid (CPU), averaged over mirrorings.
        """
        image = torch.as_tensor(image).to(self.device)
        total: torch.Tensor | None = None
        combos = mirror_combinations(self.infer.mirror_axes)
        for flip in combos:
            x = torch.flip(image, flip) if flip else image
            out = sliding_window_inference(
                x,
                roi_size=self.model.plan.patch_size,
                sw_batch_size=self.infer.sw_batch_size,
                predictor=self._forward,
                overlap=self.infer.overlap,
                mode=self.infer.blend,
                progress=self.progress,
            )
            out = torch.as_tensor(out)
            out = torch.flip(out, flip) if flip else out
            total = out if total is None else total + out
        assert total is not None
        mean = (total / len(combos)).float().cpu()
        return mean.as_tensor() if isinstance(mean, MetaTensor) else mean

    def preprocess(self, channels: Volume | Sequence[Volume]) -> MetaTensor:
        """Channels on one grid -> ``(C, X', Y', Z')`` MetaTensor on the plan's grid."""
        items = [channels] if isinstance(channels, Volume) else list(channels)
        with reraise_medseg():
            return self._preprocess({"image": items})["image"]

    def predict(self, channels: Volume | Sequence[Volume]) -> Volume:
        """Segment one case.

        Args:
            channels: One volume per model input channel (or one multi-channel volume), on one grid.

        Returns:
            A label :class:`Volume` ``(1, X, Y, Z)`` with exactly the input's geometry and the
            model's label names in ``meta["label_names"]``.
        """
        items = [channels] if isinstance(channels, Volume) else list(channels)
        source = stack_channels(items)
        expected = len(self.model.plan.channels)
        if source.channels != expected:
            raise ModelError(
                f"{source.source}: model expects {expected} channel(s) "
                f"({', '.join(c.name for c in self.model.plan.channels)}), got {source.channels}"
            )
        t0 = time.perf_counter()
        image = self.preprocess(source)
        t1 = time.perf_counter()
        logits = self.predict_logits(image[None])[0]
        t2 = time.perf_counter()
        labels = self._to_input_grid(logits, image.affine, source)
        t3 = time.perf_counter()
        self.last_timings = {"preprocess_s": t1 - t0, "network_s": t2 - t1, "resample_s": t3 - t2}
        return Volume(
            array=labels[None],
            geometry=source.geometry,
            kind="label",
            source=source.source,
            meta={"label_names": self.label_names},
        )

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
        plain = logits.as_tensor() if isinstance(logits, MetaTensor) else logits
        probs = MetaTensor(torch.softmax(plain, dim=0), affine=torch.as_tensor(network_affine, dtype=torch.float64))
        resample = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)  # type: ignore[arg-type]
        resampled = resample(
            probs,
            dst_affine=torch.tensor(np.array(source.geometry.affine), dtype=torch.float64),
            spatial_size=source.geometry.shape,
        )
        labels = torch.argmax(torch.as_tensor(resampled), dim=0).numpy()
        return labels.astype(label_dtype(int(logits.shape[0]) - 1))

    def predict_paths(self, inputs: Sequence[PathLike]) -> Volume:
        """Load channel files (or one DICOM folder) and predict."""
        return self.predict([load_volume(p) for p in inputs])

    def describe(self) -> dict[str, Any]:
        """Settings used, for the YAML written beside predictions."""
        return {
            "model": str(Path(self.model.path).resolve()),
            "device": str(self.device),
            "precision": str(self.dtype).replace("torch.", "") if self.dtype else "fp32",
            "infer": self.infer.model_dump(mode="json"),
        }
