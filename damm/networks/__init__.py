"""DAMM-Diffusion networks: per-modality latent autoencoders and the two-branch denoiser."""

from __future__ import annotations

from damm.networks.autoencoder import (
    AutoencoderOutput,
    LatentAutoencoder,
    build_autoencoder,
    build_discriminator,
    compute_scale_factor,
)
from damm.networks.denoiser import (
    DEMO_DENOISER_CONFIG,
    PAPER_DENOISER_CONFIG,
    DAMMDenoiser,
    DAMMOutput,
    count_parameters,
    paper_denoiser_config,
    reference_forward_all,
)
from damm.networks.export import AutoencoderExport, DenoiserExport
from damm.networks.fusion import MMFM, UAFM, ModalityGate, SqueezeExcitation

__all__ = [
    "DEMO_DENOISER_CONFIG",
    "MMFM",
    "PAPER_DENOISER_CONFIG",
    "UAFM",
    "AutoencoderExport",
    "AutoencoderOutput",
    "DAMMDenoiser",
    "DAMMOutput",
    "DenoiserExport",
    "LatentAutoencoder",
    "ModalityGate",
    "SqueezeExcitation",
    "build_autoencoder",
    "build_discriminator",
    "compute_scale_factor",
    "count_parameters",
    "paper_denoiser_config",
    "reference_forward_all",
]
