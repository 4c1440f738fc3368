"""The ``medseg`` command starts light: torch, MONAI, pydicom, ... are imported only by the subcommand needing them.

Each check runs in a fresh interpreter (the test process has long imported everything).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

#: Libraries that made `medseg --help` take 3-6 s when the parsers imported their stages.
HEAVY = ("torch", "monai", "highdicom", "pydicom", "SimpleITK", "nibabel", "scipy", "matplotlib", "numpy")


def _modules_after(code: str, cwd: Path) -> tuple[set[str], str]:
    """Run ``code`` in a fresh interpreter; the modules it left in ``sys.modules`` and its stdout."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, check=True)
    *printed, last = out.stdout.splitlines()
    return set(json.loads(last)), "\n".join(printed)


def test_import_medseg_cli_loads_neither_torch_nor_monai(tmp_path: Path) -> None:
    modules, _ = _modules_after("import medseg.cli", tmp_path)
    assert "medseg.cli" in modules
    assert "torch" not in modules and "monai" not in modules


def test_building_the_parser_loads_no_heavy_library(tmp_path: Path) -> None:
    """What ``medseg --help`` does: every subcommand registered, none of their stages imported."""
    code = "import medseg.cli\nparser = medseg.cli.build_parser()\nassert 'predict' in parser.format_help()"
    modules, _ = _modules_after(code, tmp_path)
    assert sorted(m for m in HEAVY if m in modules) == []


def test_info_on_a_nifti_file_runs_without_torch(tmp_path: Path) -> None:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine), tmp_path / "x.nii.gz")
    code = "from medseg.cli import main\nassert main(['info', 'x.nii.gz', '--json']) == 0"
    modules, printed = _modules_after(code, tmp_path)
    info = json.loads(printed)
    assert info["volume"]["shape"] == [2, 3, 4] and info["volume"]["spacing"] == pytest.approx([0.8, 0.8, 2.5])
    assert info["volume"]["value_range"] == [0.0, 23.0]
    assert "nibabel" in modules  # the subcommand did load its stage ...
    assert "torch" not in modules and "monai" not in modules  # ... and nothing it does not need


@pytest.mark.parametrize("package", ["medseg", "medseg.io", "medseg.batch", "medseg.evaluate", "medseg.pacs"])
def test_lazy_package_attributes_are_the_defining_modules_objects(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        value = getattr(module, name)
        if name == "__version__":
            continue
        home = sys.modules[getattr(value, "__module__", "")] if hasattr(value, "__module__") else None
        assert home is None or getattr(home, name, value) is value, f"{package}.{name}"
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = module.not_a_name


def test_lazy_package_imports_submodules_on_attribute_access(tmp_path: Path) -> None:
    code = "import medseg\nassert medseg.io.load_volume is medseg.load_volume\nimport medseg.io.volume as v\n"
    code += "assert medseg.Volume is v.Volume and medseg.io.dicom.scan_dicom is medseg.io.scan_dicom"
    _modules_after(code, tmp_path)
