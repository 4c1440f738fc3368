"""A short CPU run of nnU-Net's own trainer for ``benchmarks/bench_nnunet.py``.

``nnUNetTrainerBench`` is ``nnUNetTrainer`` with a short schedule (2 epochs x 25 iterations, 2 validation
iterations) so that a model for the benchmark trains in minutes on a CPU; network, plans, data
augmentation, loss and checkpoint format are nnU-Net's.  Its checkpoints name this class, so the
benchmark registers it with nnU-Net's trainer lookup before ``nnUNetPredictor`` loads the folder.
"""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBench(nnUNetTrainer):
    """nnUNetTrainer, 2 epochs of 25 iterations (CPU-sized)."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cpu"),  # noqa: B008 - nnU-Net's signature
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 2
        self.save_every = 1
