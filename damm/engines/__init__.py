"""Ignite/MONAI engines, datasets and handlers for training, sampling and checking DAMM-Diffusion.

Checkpoint handlers (``AtomicCheckpointSaver``, ``ResumeFromCheckpoint``) are shared with DRDM: see
:mod:`ddcore.checkpoints`.
"""

from __future__ import annotations

from damm.engines.autoencoder_trainer import (
    AutoencoderEvaluator,
    AutoencoderTrainer,
    build_perceptual_loss,
    reconstruction_metrics,
    to_unit_range,
)
from damm.engines.diffusion_trainer import LOGGED_KEYS, DAMMDiffusionTrainer, ForwardAll
from damm.engines.handlers import ProgressBar, every_n_iterations, scalar_logs
from damm.engines.latent_cache import LatentCacheDataset, has_random_transform, latent_crop
from damm.engines.synthesis import SynthesisEvaluator, describe_scheduler

__all__ = [
    "LOGGED_KEYS",
    "AutoencoderEvaluator",
    "AutoencoderTrainer",
    "DAMMDiffusionTrainer",
    "ForwardAll",
    "LatentCacheDataset",
    "ProgressBar",
    "SynthesisEvaluator",
    "build_perceptual_loss",
    "describe_scheduler",
    "every_n_iterations",
    "has_random_transform",
    "latent_crop",
    "reconstruction_metrics",
    "scalar_logs",
    "to_unit_range",
]
