"""Inference preprocessing with the training pipeline's exact steps, but memory-lean resampling.

MONAI's ``Spacingd`` resamples in float64 through a full-size sampling grid: about 10 GiB
of temporaries for a 512x512x600 CT.  :class:`ChunkedSpacingd` asks MONAI for the output
grid (a lazy ``Spacingd`` call on a zero-stride proxy, so the grid is MONAI's to the last
bit) and fills it chunk by chunk with float32 trilinear sampling
(:func:`medseg.infer.resample.resample_image`, equal to MONAI's result to float32
rounding).  Every other step is the training pipeline's own transform.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Spacingd

from medseg.data.plan import Plan
from medseg.data.transforms import preprocess_transforms
from medseg.infer.resample import CHUNK_BYTES, resample_image

__all__ = ["ChunkedSpacingd", "inference_preprocess"]


class ChunkedSpacingd(MapTransform):
    """MONAI ``Spacingd`` (bilinear, border padding) computed chunk by chunk in float32.

    Args:
        spacing: The ``Spacingd`` of the training pipeline; keys or modes it does not
            cover here (nearest, other padding) are delegated to it unchanged.
        chunk_bytes: Budget for one chunk's temporaries.
    """

    def __init__(self, spacing: Spacingd, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(spacing.keys, allow_missing_keys=spacing.allow_missing_keys)
        self.spacing = spacing
        self.chunk_bytes = chunk_bytes
        self._lazy = copy.deepcopy(spacing)  # a separate instance: lazy mode must not leak into `spacing`
        self._lazy.lazy = True

    def _chunkable(self, index: int) -> bool:
        mode = str(self.spacing.mode[index]).lower()
        padding = str(self.spacing.padding_mode[index]).lower()
        return mode.endswith("bilinear") and padding.endswith("border")

    def target_grid(self, image: MetaTensor) -> tuple[np.ndarray, tuple[int, int, int]]:
        """MONAI's output affine and spatial shape for ``image``, without touching its data."""
        proxy = MetaTensor(
            torch.zeros((1,) * image.ndim).expand(*image.shape),
            affine=torch.as_tensor(image.affine).detach().cpu().to(torch.float64).clone(),
        )
        out = self._lazy({self.keys[0]: proxy})[self.keys[0]]
        assert isinstance(out, MetaTensor)
        shape = tuple(int(s) for s in out.peek_pending_shape())
        affine = np.asarray(torch.as_tensor(out.peek_pending_affine()).cpu().numpy(), dtype=np.float64)
        return affine, (shape[0], shape[1], shape[2])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resample the keys' ``(C, X, Y, Z)`` MetaTensors onto MONAI's ``Spacingd`` grid."""
        d = dict(data)
        for index, key in enumerate(self.key_iterator(d)):
            image = d[key]
            if not self._chunkable(index) or not isinstance(image, MetaTensor):
                d[key] = self.spacing({key: image})[key]
                continue
            affine, shape = self.target_grid(image)
            source_affine = torch.as_tensor(image.affine).detach().cpu().numpy().astype(np.float64)
            if np.allclose(affine, source_affine, atol=1e-6) and shape == tuple(image.shape[1:]):
                continue  # MONAI skips identity resampling too
            out = resample_image(
                image.as_tensor(),
                source_affine=source_affine,
                target_affine=affine,
                target_shape=shape,
                chunk_bytes=self.chunk_bytes,
            )
            meta = {k: v for k, v in image.meta.items() if k != "affine"}
            d[key] = MetaTensor(out, affine=torch.as_tensor(affine), meta=meta)
        return d


def inference_preprocess(plan: Plan, *, chunk_bytes: int = CHUNK_BYTES) -> Compose:
    """The training preprocessing (``preprocess_transforms(plan, with_label=False)``) with chunked spacing."""
    steps = [
        ChunkedSpacingd(t, chunk_bytes=chunk_bytes) if isinstance(t, Spacingd) else t
        for t in preprocess_transforms(plan, with_label=False).transforms
    ]
    return Compose(steps)
