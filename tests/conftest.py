from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
NNUNET_FIXTURES = Path(__file__).with_name("nnunet_fixtures.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("MEDSEG_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: use --runslow or MEDSEG_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not available at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small freshly generated CT phantom dataset (4 training, 2 held-out cases) plus its DICOM case."""
    from medseg.sample_data import generate_dataset, make_phantom, write_ct_dicom_series

    root = tmp_path_factory.mktemp("phantoms")
    generate_dataset(root, "Dataset001_CTPhantom", num_train=4, num_test=2)
    phantom = make_phantom(4, modality="CT")
    write_ct_dicom_series(phantom.channels[0], root / "dicom" / "ct_004", case_id="ct_004")
    return root


@pytest.fixture(scope="session")
def tiny_model(sample_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for a few iterations (fast; not accurate)."""
    from medseg.config import load_config
    from medseg.train.loop import train

    config = load_config(
        overrides={
            "model.channels": [8, 16, 32],
            "model.strides": [2, 2],
            "preprocess.patch_size": [32, 32, 16],
            "train.iterations": 12,
            "train.augment": True,
        }
    )
    out = tmp_path_factory.mktemp("model") / "model"
    return train(sample_root / "Dataset001_CTPhantom", config=config, out_dir=out, progress=False)


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the nnU-Net folders and references once (subprocess; nnU-Net paths only in its environment).

    Shared by tests/test_nnunet.py and tests/test_export.py (about a minute on 2 cores).
    """
    pytest.importorskip("nnunetv2", reason="nnunetv2 (test extra) builds the reference folders")
    pytest.importorskip("dynamic_network_architectures")
    root = tmp_path_factory.mktemp("nnunet")
    env = {
        **os.environ,
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    done = subprocess.run(
        [sys.executable, str(NNUNET_FIXTURES), str(root)], env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        pytest.fail(f"building nnU-Net fixtures failed:\n{done.stderr[-4000:]}")
    return root


@pytest.fixture(scope="session")
def models(nnunet_root: Path) -> dict:
    return json.loads((nnunet_root / "models.json").read_text())
