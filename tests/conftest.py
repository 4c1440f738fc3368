from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
