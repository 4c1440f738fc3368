"""The model directory: everything ``predict`` needs, nothing else.

```
model/
  config.yaml    resolved config of the run that made the model
  plan.yaml      spacing, orientation, normalisation (+ statistics), patch, labels, network
  weights.pt     state dict only; loaded with ``torch.load(weights_only=True)``
  metrics.json   training/validation results the model was selected on
```

A training run adds ``splits.json``, ``train_log.csv`` and ``checkpoints/{last,best}.pt``
(full training state, see :mod:`medseg.train.checkpoint`); ``predict`` needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.config import Config, load_config, save_config
from medseg.data.plan import Plan, load_plan, save_plan
from medseg.errors import ConfigError, ModelError
from medseg.io.images import atomic_path, write_json_atomic
from medseg.models.adapters.medseg_dir import MODEL_FILES, check_model_dir
from medseg.models.networks import build_network
from medseg.models.safe_load import load_weights
from medseg.types import PathLike

__all__ = ["MODEL_FILES", "LoadedModel", "load_model", "save_model"]


@dataclass
class LoadedModel:
    """A model directory loaded into memory (network in eval mode on CPU)."""

    path: Path
    config: Config
    plan: Plan
    network: nn.Module


def save_model(
    directory: PathLike,
    *,
    config: Config,
    plan: Plan,
    state_dict: dict[str, torch.Tensor],
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory; each file is written atomically, weights last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(config, directory / "config.yaml")
    save_plan(plan, directory / "plan.yaml")
    write_json_atomic(directory / "metrics.json", metrics or {})
    with atomic_path(directory / "weights.pt", overwrite=True) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    return directory


def load_model(directory: PathLike) -> LoadedModel:
    """Load a model directory.

    Raises:
        ModelError: Missing files, invalid config/plan, or weights that do not fit the network.
    """
    directory = check_model_dir(Path(directory))
    try:
        config = load_config(directory / "config.yaml")
        plan = load_plan(directory / "plan.yaml")
    except ConfigError as exc:
        raise ModelError(str(exc)) from exc
    network = build_network(plan.network)
    state = load_weights(directory / "weights.pt")  # typed errors; never unpickles, never suggests it
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ModelError(f"{directory / 'weights.pt'}: cannot load weights ({str(exc).splitlines()[0]})") from exc
    network.eval()
    return LoadedModel(path=directory, config=config, plan=plan, network=network)
