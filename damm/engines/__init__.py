"""Ignite/MONAI engines, datasets and handlers for training, sampling and checking DAMM-Diffusion."""

from __future__ import annotations

from damm.engines.autoencoder_trainer import (
    AutoencoderEvaluator,
    AutoencoderTrainer,
    build_perceptual_loss,
    reconstruction_metrics,
    to_unit_range,
)
from damm.engines.diffusion_trainer import LOGGED_KEYS, DAMMDiffusionTrainer, ForwardAll
from damm.engines.handlers import (
    AtomicCheckpointSaver,
    ProgressBar,
    ResumeFromCheckpoint,
    check_state_dict,
    every_n_iterations,
    is_rank_zero,
    latest_checkpoint,
    load_checked_state_dict,
    scalar_logs,
)
from damm.engines.latent_cache import LatentCacheDataset, has_random_transform
from damm.engines.synthesis import SynthesisEvaluator, describe_scheduler

__all__ = [
    "LOGGED_KEYS",
    "AtomicCheckpointSaver",
    "AutoencoderEvaluator",
    "AutoencoderTrainer",
    "DAMMDiffusionTrainer",
    "ForwardAll",
    "LatentCacheDataset",
    "ProgressBar",
    "ResumeFromCheckpoint",
    "SynthesisEvaluator",
    "build_perceptual_loss",
    "check_state_dict",
    "describe_scheduler",
    "every_n_iterations",
    "has_random_transform",
    "is_rank_zero",
    "latest_checkpoint",
    "load_checked_state_dict",
    "reconstruction_metrics",
    "scalar_logs",
    "to_unit_range",
]
