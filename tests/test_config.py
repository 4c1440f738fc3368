from __future__ import annotations

from pathlib import Path

import pytest

from medseg.config import load_config, save_config
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


#: Not training configs; validated by their own tests (PACS profile: tests/test_pacs_units.py; batch
#: selection rules: tests/test_batch_selection.py).
_NOT_TRAINING_CONFIGS = {"pacs_profile.example.yaml", "batch_rules.yaml"}


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in _NOT_TRAINING_CONFIGS)
)
def test_shipped_configs_are_valid(name: str) -> None:
    config = load_config(REPO / "configs" / name)
    if config.model.channels != "auto":  # "auto": planned from the dataset (medseg plan)
        assert len(config.model.strides) == len(config.model.channels) - 1


def test_errors_name_every_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  iteratons: 5\n  learning_rate: -1\ninfer:\n  overlap: 1.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert str(path) in text
    for key in ("train.iteratons", "train.learning_rate", "infer.overlap"):
        assert key in text


def test_inconsistent_network_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="strides"):
        load_config(overrides={"model.channels": [8, 16], "model.strides": [2, 2]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(overrides={"train.iterations": 7, "infer.mirror_axes": [0, 2]})
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
