"""The README's main job, end to end (slow: about a minute on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medseg.demo import run_demo


@pytest.mark.slow
def test_demo_reaches_target_dice_with_outputs_on_input_grids(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo", progress=False, log=lambda *_: None)
    assert result["mean_foreground_dice"] >= 0.85
    images = Path(result["dataset"]) / "imagesTs"
    for image in sorted(images.glob("*_0000.nii.gz")):
        pred = Path(result["predictions"]) / image.name.replace("_0000", "")
        a, b = sitk.ReadImage(str(image)), sitk.ReadImage(str(pred))
        assert a.GetSize() == b.GetSize()
        assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-5)
        assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-7)
    assert (Path(result["report"]) / "report.md").is_file()
