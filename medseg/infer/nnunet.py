"""nnU-Net's prediction, step by step, on medseg's machinery (the pipeline for :class:`NnUNetRecipe`).

nnU-Net's ``nnUNetPredictor`` reads the image with the plans' reader (SimpleITK: array ``(z, y, x)``,
spacing reversed), then ``DefaultPreprocessor``: float32 copy -> ``transpose_forward`` -> crop to the
bounding box of the non-zero voxels of all channels -> per-channel normalisation (CT: clip to the
foreground 0.5/99.5 percentiles and z-score with the plans' statistics; z-score over the image or, with
``use_mask_for_norm``, over the hole-filled non-zero mask) -> resampling to the configuration spacing
(``resampling_fn_data``, cubic with nnU-Net's separate-z rule) -> sliding windows (its step placement and
Gaussian) averaged over folds and mirrorings -> logits resampled back to the cropped shape
(``resampling_fn_probabilities``, linear) -> argmax, or sigmoid > 0.5 per region in
``regions_class_order`` -> pasted into the uncropped shape -> ``transpose_backward``.

Here every step is the same function of the same numbers, with medseg's implementation where it is
faster: the reader's axis order is a view of medseg's ``(C, X, Y, Z)`` volume; the bounding box comes
from axis projections (filling holes does not move it, so ``binary_fill_holes`` runs only for
``use_mask_for_norm``); resampling is :mod:`medseg.infer.separable` (SciPy's/torch's operators applied as
banded float32 products instead of float64 splines); windows are medseg's streamed blending
(float32 accumulation where nnU-Net accumulates in float16) with bf16 channels-last networks on CPUs
that have it; the logits go back chunk by chunk and are reduced to labels at once (never all classes at
full resolution).  Labels get the input's own geometry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from medseg.data.datasets import GRID_ATOL
from medseg.errors import ModelError
from medseg.infer.separable import (
    ResamplePlan,
    Stage,
    coordinates_operator,
    resample,
    resample_chunks,
    torch_operator,
    zoom_operator,
)
from medseg.infer.sliding_window import class_argmax, iter_logit_slabs
from medseg.io import Geometry, Volume, label_dtype
from medseg.models.adapters.nnunet import NnUNetRecipe

if TYPE_CHECKING:
    from medseg.infer.predictor import Predictor, ProbabilityDtype
    from medseg.models.adapters.base import ModelAdapter

__all__ = [
    "AxisMap",
    "NnUNetPipeline",
    "Prepared",
    "compute_new_shape",
    "crop_box",
    "nnunet_resample_plan",
    "reader_axes",
    "separate_z",
]

#: nnU-Net's ANISO_THRESHOLD.
ANISO_THRESHOLD = 3.0

#: Logit of every non-background class (every region) where no window ran: background, decisively.
EMPTY_LOGIT = -30.0

#: Side of the blocks (cropped input voxels) of the coarse body mask that decides which windows run.
BODY_BLOCK = 4


# ------------------------------------------------------------------------------- axis order
@dataclass(frozen=True)
class AxisMap:
    """A signed axis permutation from medseg's ``(X, Y, Z)`` to nnU-Net's array axes.

    nnU-Net axis ``d`` is medseg axis ``perm[d]``, reversed where ``flip[perm[d]]``.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    def forward(self, array: np.ndarray) -> np.ndarray:
        """``(C, X, Y, Z)`` -> ``(C, d0, d1, d2)`` view."""
        for axis in range(3):
            if self.flip[axis]:
                array = np.flip(array, axis + 1)
        return array.transpose(0, *(p + 1 for p in self.perm))

    def backward(self, array: np.ndarray) -> np.ndarray:
        """``(..., d0, d1, d2)`` -> ``(..., X, Y, Z)`` view (leading axes kept)."""
        lead = array.ndim - 3
        inverse = np.argsort(self.perm)
        out = array.transpose(*range(lead), *(int(i) + lead for i in inverse))
        for axis in range(3):
            if self.flip[axis]:
                out = np.flip(out, axis + lead)
        return out

    def spacing(self, geometry: Geometry) -> list[float]:
        """nnU-Net's spacing (array order)."""
        return [float(abs(geometry.spacing[p])) for p in self.perm]


def reader_axes(reader: str, geometry: Geometry) -> AxisMap:
    """The axis order nnU-Net's reader gives a file with this geometry.

    ``SimpleITKIO`` and ``NibabelIO``: the index axes reversed (``(z, y, x)``), whatever the direction.
    ``NibabelIOWithReorient``: nibabel's closest RAS+ reorientation first; ``SimpleITKIOWithReorient``:
    SimpleITK's ``DICOMOrient(image, "RAS")``.
    """
    if reader in ("SimpleITKIO", "NibabelIO"):
        return AxisMap(perm=(2, 1, 0), flip=(False, False, False))
    if reader == "NibabelIOWithReorient":
        from nibabel.orientations import io_orientation

        ornt = io_orientation(np.asarray(geometry.affine))
        to_ras = [0, 0, 0]  # reoriented axis k <- medseg axis
        flips = [False, False, False]
        for axis, (target, sign) in enumerate(ornt):
            to_ras[int(target)] = axis
            flips[axis] = bool(sign < 0)
        return AxisMap(perm=(to_ras[2], to_ras[1], to_ras[0]), flip=(flips[0], flips[1], flips[2]))
    if reader == "SimpleITKIOWithReorient":
        import SimpleITK as sitk

        image = sitk.Image([2, 2, 2], sitk.sitkUInt8)
        image.SetDirection(tuple(float(v) for v in np.asarray(geometry.direction).ravel()))
        orient = sitk.DICOMOrientImageFilter()
        orient.SetDesiredCoordinateOrientation("RAS")
        orient.Execute(image)
        permute = [int(v) for v in orient.GetPermuteOrder()]  # output axis k <- input axis permute[k]
        flips_out = [bool(v) for v in orient.GetFlipAxes()]  # flips of the permuted (output) axes
        flips = [False, False, False]
        for k, axis in enumerate(permute):
            flips[axis] = flips_out[k]
        return AxisMap(perm=(permute[2], permute[1], permute[0]), flip=(flips[0], flips[1], flips[2]))
    raise ModelError(f"image reader {reader!r} is not supported")  # pragma: no cover - validated on load


# ----------------------------------------------------------------------------- nnU-Net rules
def compute_new_shape(old_shape: Any, old_spacing: Any, new_spacing: Any) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(old_spacing / new_spacing * old_shape)`` per axis."""
    return tuple(int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape, strict=True))  # noqa: RUF046 - numpy floats


def _lowres_axes(spacing: Any) -> np.ndarray:
    return np.where(max(spacing) / np.array(spacing) == 1)[0]


def separate_z(
    force: bool | None, current: Any, new: Any, threshold: float = ANISO_THRESHOLD
) -> tuple[bool, int | None]:
    """nnU-Net's ``determine_do_sep_z_and_axis``: resample the thick axis separately?"""
    axis: Any
    if force is not None:
        do, axis = bool(force), (_lowres_axes(current) if force else None)
    elif np.max(current) / np.min(current) > threshold:
        do, axis = True, _lowres_axes(current)
    elif np.max(new) / np.min(new) > threshold:
        do, axis = True, _lowres_axes(new)
    else:
        do, axis = False, None
    if axis is not None:
        if len(axis) in (2, 3):
            return False, None
        axis = int(axis[0])
    return do, axis


def nnunet_resample_plan(
    function: tuple[str, tuple[tuple[str, Any], ...]],
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    current_spacing: Any,
    new_spacing: Any,
) -> ResamplePlan:
    """The operators of an nnU-Net resampling function (``resampling_fn_*`` and its kwargs), for images.

    Raises:
        ModelError: A function, order or mode medseg does not reproduce.
    """
    name, items = function
    kwargs = dict(items)
    if kwargs.get("is_seg"):
        raise ModelError(f"resampling function {name} with is_seg=True cannot resample images")
    if name == "no_resampling_hack" or tuple(in_shape) == tuple(out_shape):
        return ResamplePlan(in_shape=in_shape, out_shape=in_shape, stages=())
    if name == "resample_data_or_seg_to_shape":
        order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
        do_sep, axis = separate_z(
            kwargs.get("force_separate_z"),
            current_spacing,
            new_spacing,
            float(kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD)),
        )
        clip = "slice" if order > 0 else None
        if do_sep and axis is not None:
            in_plane = {a: zoom_operator(in_shape[a], out_shape[a], order) for a in range(3) if a != axis}
            stages = [Stage(ops=in_plane, clip=clip, clip_axis=axis)]  # type: ignore[arg-type]
            if in_shape[axis] != out_shape[axis]:
                stages.append(Stage(ops={axis: coordinates_operator(in_shape[axis], out_shape[axis], order_z)}))
            return ResamplePlan(in_shape=in_shape, out_shape=out_shape, stages=tuple(stages))
        ops = {a: zoom_operator(in_shape[a], out_shape[a], order) for a in range(3)}
        return ResamplePlan(
            in_shape=in_shape, out_shape=out_shape, stages=(Stage(ops=ops, clip="volume" if order > 0 else None),)
        )
    if name == "resample_torch_fornnunet":
        mode, aniso = str(kwargs.get("mode", "linear")), str(kwargs.get("aniso_axis_mode", "nearest-exact"))
        for m in (mode, aniso):
            if m not in ("linear", "nearest", "nearest-exact"):
                raise ModelError(f"resample_torch_fornnunet mode {m!r} is not supported")
        do_sep, axis = separate_z(
            kwargs.get("force_separate_z"),
            current_spacing,
            new_spacing,
            float(kwargs.get("separate_z_anisotropy_threshold", ANISO_THRESHOLD)),
        )
        if do_sep and axis is not None:
            in_plane = {a: torch_operator(in_shape[a], out_shape[a], mode) for a in range(3) if a != axis}
            stages = [Stage(ops=in_plane)]
            if in_shape[axis] != out_shape[axis]:
                stages.append(Stage(ops={axis: torch_operator(in_shape[axis], out_shape[axis], aniso)}))
            return ResamplePlan(in_shape=in_shape, out_shape=out_shape, stages=tuple(stages))
        # nnU-Net's non-separate branch ignores `mode`: always trilinear
        ops = {a: torch_operator(in_shape[a], out_shape[a], "linear") for a in range(3)}
        return ResamplePlan(in_shape=in_shape, out_shape=out_shape, stages=(Stage(ops=ops),))
    raise ModelError(f"resampling function {name!r} is not supported")


def crop_box(data: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels non-zero in any channel (the whole image when there is none)."""
    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, data.shape[axis + 1]))
    return box[0], box[1], box[2]


def _nonzero_mask(data: np.ndarray) -> np.ndarray:
    """nnU-Net's ``create_nonzero_mask``: any channel non-zero, holes filled."""
    from scipy.ndimage import binary_fill_holes

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    return np.asarray(binary_fill_holes(mask))


def normalize(data: np.ndarray, recipe: NnUNetRecipe, mask: np.ndarray | None) -> None:
    """nnU-Net's normalisation schemes, in place on ``(C, ...)`` float32 (same NumPy operations)."""
    for c, norm in enumerate(recipe.normalization):
        image = data[c]
        if norm.scheme == "CTNormalization":
            assert norm.mean is not None and norm.std is not None
            np.clip(image, norm.percentile_00_5, norm.percentile_99_5, out=image)
            image -= norm.mean
            image /= max(norm.std, 1e-8)
        elif norm.scheme == "ZScoreNormalization":
            if norm.use_mask:
                assert mask is not None
                values = image[mask]
                mean, std = values.mean(), values.std()
                image[mask] = (values - mean) / max(std, 1e-8)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, 1e-8)
        elif norm.scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=1e-8, a_max=None)
        elif norm.scheme == "RGBTo01Normalization":
            image /= 255.0
        # NoNormalization: unchanged


# ------------------------------------------------------------------------------ air windows
def body_blocks(cropped: np.ndarray, recipe: NnUNetRecipe, *, block: int = BODY_BLOCK) -> np.ndarray:
    """Coarse body mask of the cropped raw image: does a ``block``-sided cube hold a body voxel?

    Body, per channel (any channel counts): CT normalisation -> raw value above
    :data:`medseg.infer.crop.CT_BODY_HU`; z-score with ``use_mask_for_norm`` -> non-zero (nnU-Net's own
    foreground); otherwise -> above the channel's minimum.

    Args:
        cropped: ``(C, n0, n1, n2)`` raw intensities (before normalisation), nnU-Net's axis order.
        recipe: The folder's recipe (one normalisation per channel).
        block: Block side in voxels.

    Returns:
        ``(ceil(n0 / block), ceil(n1 / block), ceil(n2 / block))`` bool.
    """
    from medseg.infer.crop import CT_BODY_HU

    shape = cropped.shape[1:]
    nb = [-(-int(n) // block) for n in shape]
    out = np.zeros(nb, dtype=bool)
    rules: list[tuple[str, float]] = []
    for c, norm in enumerate(recipe.normalization):
        if norm.scheme == "CTNormalization":
            rules.append((">", CT_BODY_HU))
        elif norm.use_mask:
            rules.append(("!=", 0.0))
        else:
            rules.append((">", float(cropped[c].min())))
    pad = (nb[1] * block - shape[1], nb[2] * block - shape[2])
    for b, i in enumerate(range(0, int(shape[0]), block)):
        chunk = cropped[:, i : i + block]
        mask = np.zeros(chunk.shape[2:], dtype=bool)
        for c, (op, value) in enumerate(rules):
            hits = chunk[c] > value if op == ">" else chunk[c] != value
            mask |= hits.any(axis=0)
        mask = np.pad(mask, ((0, pad[0]), (0, pad[1])))
        out[b] = mask.reshape(nb[1], block, nb[2], block).any(axis=(1, 3))
    return out


def _reach(function: tuple[str, tuple[tuple[str, Any], ...]]) -> int:
    """Network voxels around a point that a resampling function reads (linear/nearest: 1; cubic: more)."""
    name, items = function
    kwargs = dict(items)
    if name == "resample_data_or_seg_to_shape" and max(int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))) > 1:
        return 8  # cubic splines are global; 8 voxels away their weight is below 1e-4
    return 1


@dataclass
class BodyWindows:
    """Which of nnU-Net's windows to run: those near a body voxel (``run_window`` of the slab iterator).

    A window runs when the cropped input region it maps to, grown by what the logits' way back reads
    (``grow`` network voxels) and by the cubic support of the forward resampling (2 input voxels),
    holds a body block.  Every input voxel of the body is then covered only by run windows, so its
    logits are exactly those of the full tiling.

    Attributes:
        blocks: Coarse body mask (:func:`body_blocks`) of the cropped input.
        block: Its block side.
        scale: Cropped input size / network grid size per axis.
        crop_shape: Cropped input shape.
        grow: Network voxels added around each window.
        run: Windows run so far.
        skipped: Windows skipped so far.
    """

    blocks: np.ndarray
    block: int
    scale: tuple[float, float, float]
    crop_shape: tuple[int, int, int]
    grow: int
    run: int = 0
    skipped: int = 0

    def __call__(self, region: tuple[slice, slice, slice]) -> bool:
        """Whether the window over ``region`` (network grid, three slices) holds or feeds a body voxel."""
        index = []
        for axis, part in enumerate(region):
            r, n = self.scale[axis], self.crop_shape[axis]
            first = (part.start - self.grow + 0.5) * r - 0.5  # centre mapping of the resampling functions
            last = (part.stop - 1 + self.grow + 0.5) * r - 0.5
            lo = min(n - 1, max(0, int(np.floor(first)) - 2))
            hi = min(n - 1, max(0, int(np.ceil(last)) + 2))
            index.append(slice(lo // self.block, hi // self.block + 1))
        hit = bool(self.blocks[tuple(index)].any())
        if hit:
            self.run += 1
        else:
            self.skipped += 1
        return hit


# ---------------------------------------------------------------------------------- pipeline
@dataclass
class Prepared:
    """A case on the network grid and what is needed to go back.

    Attributes:
        image: ``(C, *net_shape)`` float32 network input.
        axes: medseg -> reader axis map (before ``transpose_forward``).
        shape_before_crop: Transposed array shape.
        box: Crop box in the transposed array.
        back: Resampling from the network grid to the cropped shape.
        body: Which windows to run (``None``: every window).
    """

    image: torch.Tensor
    axes: AxisMap
    shape_before_crop: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    back: ResamplePlan
    body: BodyWindows | None = None


class NnUNetPipeline:
    """Runs an :class:`NnUNetRecipe` for a :class:`~medseg.infer.predictor.Predictor`."""

    def __init__(self, adapter: ModelAdapter, predictor: Predictor) -> None:
        recipe = adapter.preprocessing
        assert isinstance(recipe, NnUNetRecipe)
        self.recipe = recipe
        self.window = adapter.window
        self.output = adapter.output
        self.predictor = predictor

    # ------------------------------------------------------------------ preprocessing
    def prepare(self, channels: Sequence[Volume]) -> Prepared:
        """nnU-Net's preprocessing of the channel volumes (one grid; see the module docstring)."""
        recipe = self.recipe
        first = channels[0]
        for index, other in enumerate(channels[1:], start=1):
            first.geometry.require_same(
                other.geometry,
                atol=GRID_ATOL,
                what=f"image channel 0 ({first.source}) and channel {index} ({other.source})",
            )
        axes = reader_axes(recipe.reader, first.geometry)
        spacing = axes.spacing(first.geometry)
        views = [axes.forward(c.array) for c in channels]
        data = np.empty((sum(int(v.shape[0]) for v in views), *views[0].shape[1:]), dtype=np.float32)
        start = 0
        for view in views:  # nnU-Net's float32 copy, C order of its array axes
            data[start : start + view.shape[0]] = view
            start += int(view.shape[0])
        del views
        tf = recipe.transpose_forward
        data = data.transpose(0, *(i + 1 for i in tf))
        spacing_t = [spacing[i] for i in tf]
        shape_before = (int(data.shape[1]), int(data.shape[2]), int(data.shape[3]))
        box = crop_box(data)
        cropped = data[(slice(None), box[0], box[1], box[2])]
        blocks = body_blocks(cropped, recipe) if self.predictor.infer.body_crop != "none" else None
        mask = _nonzero_mask(cropped) if any(n.use_mask for n in recipe.normalization) else None
        normalize(cropped, recipe, mask)
        del mask
        target = list(recipe.spacing) if len(recipe.spacing) == 3 else [spacing_t[0], *recipe.spacing]
        crop_shape = (int(cropped.shape[1]), int(cropped.shape[2]), int(cropped.shape[3]))
        net_shape = compute_new_shape(crop_shape, spacing_t, target)
        forward = nnunet_resample_plan(recipe.resampling_data, crop_shape, net_shape, spacing_t, target)  # type: ignore[arg-type]
        tensor = torch.from_numpy(cropped)
        image = tensor.contiguous() if forward.is_identity else resample(forward, tensor)
        del data, cropped, tensor
        net_shape = tuple(int(s) for s in image.shape[1:])
        back = nnunet_resample_plan(recipe.resampling_probabilities, net_shape, crop_shape, target, spacing_t)  # type: ignore[arg-type]
        body = None
        if blocks is not None:
            body = BodyWindows(
                blocks=blocks,
                block=BODY_BLOCK,
                scale=(crop_shape[0] / net_shape[0], crop_shape[1] / net_shape[1], crop_shape[2] / net_shape[2]),
                crop_shape=crop_shape,
                grow=_reach(recipe.resampling_probabilities),
            )
        return Prepared(image=image, axes=axes, shape_before_crop=shape_before, box=box, back=back, body=body)

    # ------------------------------------------------------------------ windows
    def empty_logits(self) -> torch.Tensor:
        """``(K,)`` logits where no window ran: background (softmax) or every region off."""
        k = self.output.num_outputs
        empty = torch.full((k,), EMPTY_LOGIT)
        if self.output.kind == "softmax":
            empty[0] = 0.0
        return empty

    def _slabs(self, image: torch.Tensor, body: BodyWindows | None = None) -> Any:
        p = self.predictor
        return iter_logit_slabs(
            image,
            p.windows,
            roi_size=self.window.patch_size,
            overlap=p.infer.overlap,
            mode=p.infer.blend,
            sigma_scale=self.window.sigma_scale,
            sw_batch_size=p.infer.sw_batch_size,
            stitch_device=p.stitch_device(tuple(image.shape[1:]), self.window.patch_size, self.output.num_outputs),
            progress=p.progress,
            tiling="nnunet",
            spatial_dims=self.window.spatial_dims,
            run_window=body,
            empty_logits=self.empty_logits() if body is not None else None,
        )

    def _store(self, image: torch.Tensor, body: BodyWindows | None = None) -> torch.Tensor:
        """Blended logits on the whole network grid (float16 or float32)."""
        store_dtype = torch.float16 if self.predictor.infer.logits_dtype == "float16" else torch.float32
        store = torch.empty((self.output.num_outputs, *image.shape[1:]), dtype=store_dtype)
        for slab in self._slabs(image, body):
            logits = slab.logits.clamp_(-6e4, 6e4) if store_dtype == torch.float16 else slab.logits
            store.narrow(slab.axis + 1, slab.start, slab.stop - slab.start).copy_(logits)
        return store

    # ------------------------------------------------------------------ decoding
    def _decode(self, logits: torch.Tensor) -> torch.Tensor:
        """``(K, ...)`` logits -> labels (int64), as nnU-Net's LabelManager."""
        out = self.output
        if out.kind == "softmax":
            return class_argmax(logits)
        probs = torch.sigmoid(logits)
        seg = torch.zeros(logits.shape[1:], dtype=torch.int64)
        for i, value in enumerate(out.regions_class_order):
            seg[probs[i] > 0.5] = value
        return seg

    def _probabilities(self, logits: torch.Tensor, dtype: ProbabilityDtype) -> np.ndarray:
        probs = torch.softmax(logits, dim=0) if self.output.kind == "softmax" else torch.sigmoid(logits)
        np_dtype = np.dtype(dtype)
        if np_dtype.kind == "u":
            return torch.round(probs * float(np.iinfo(np_dtype).max)).numpy().astype(np_dtype)
        return probs.numpy().astype(np_dtype)

    def logits(self, channels: Sequence[Volume]) -> tuple[np.ndarray, Prepared]:
        """Logits resampled to the cropped input shape, in nnU-Net's (transposed) axis order (for checks).

        Returns:
            ``((K, *cropped shape) float32, prepared case)``.
        """
        prepared = self.prepare(channels)
        store = self._store(prepared.image, prepared.body)
        out = np.empty((store.shape[0], *prepared.back.out_shape), dtype=np.float32)
        if prepared.back.is_identity:
            out[:] = store.float().numpy()
        else:
            for o0, o1, block in resample_chunks(prepared.back, store):
                out[:, o0:o1] = block.numpy()
        return out, prepared

    def run(
        self, channels: Sequence[Volume], probabilities: ProbabilityDtype | None
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, float]]:
        """Labels ``(X, Y, Z)`` (and probabilities ``(K, X, Y, Z)``) on the input grid, plus timings."""
        windows = self.predictor.windows
        t0 = time.perf_counter()
        prepared = self.prepare(channels)
        t1 = time.perf_counter()
        forward_before, calls_before = windows.seconds, windows.calls
        out = self.output
        k = out.num_outputs
        labels_t = np.zeros(prepared.shape_before_crop, dtype=label_dtype(out.max_label))
        probs_t: np.ndarray | None = None
        if probabilities is not None:
            probs_t = np.zeros((k, *prepared.shape_before_crop), dtype=np.dtype(probabilities))
            if out.kind == "softmax":
                probs_t[0] = np.iinfo(probs_t.dtype).max if probs_t.dtype.kind == "u" else 1.0
        box = prepared.box

        def put(o0: int, o1: int, axis: int, logits: torch.Tensor) -> None:
            region = [box[0], box[1], box[2]]
            region[axis] = slice(box[axis].start + o0, box[axis].start + o1)
            labels_t[tuple(region)] = self._decode(logits).numpy()
            if probs_t is not None and probabilities is not None:
                probs_t[(slice(None), region[0], region[1], region[2])] = self._probabilities(logits, probabilities)

        if prepared.back.is_identity:  # network grid = cropped input grid: labels straight from the slabs
            for slab in self._slabs(prepared.image, prepared.body):
                put(slab.start, slab.stop, slab.axis, slab.logits)
            t2 = t3 = time.perf_counter()
        else:
            store = self._store(prepared.image, prepared.body)
            t2 = time.perf_counter()
            for o0, o1, block in resample_chunks(prepared.back, store):
                put(o0, o1, 0, block)
            del store
            t3 = time.perf_counter()
        del prepared.image
        backward = self.recipe.transpose_backward
        labels = prepared.axes.backward(labels_t.transpose(backward))
        probs = None
        if probs_t is not None:
            probs = prepared.axes.backward(probs_t.transpose(0, *(i + 1 for i in backward)))
        timings = {
            "preprocess_s": round(t1 - t0, 4),
            "network_s": round(t2 - t1, 4),
            "forward_s": round(windows.seconds - forward_before, 4),
            "windows": windows.calls - calls_before,
            "windows_skipped": prepared.body.skipped if prepared.body is not None else 0,
            "resample_s": round(t3 - t2, 4),
        }
        return labels, probs, timings
