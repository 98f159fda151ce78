"""DRDM: deformation-recovery diffusion (forward deformation diffusion, recovery network, sampling, training).

Fields are voxel-unit tensors ``[B, d, *S]`` in the MONAI ``Warp`` convention (see :mod:`drdm.fields`).
"""

from __future__ import annotations

from drdm import diffusion, fields, io, losses, networks, sampler, trainer, workflows
from drdm.diffusion import DeformationDiffusion, ForwardSample, PowerSchedule
from drdm.fields import compose, flow_power, flow_power_sequential, folding_fraction, jacobian_determinant, warp
from drdm.losses import DRDMLoss
from drdm.networks import RecoveryNet
from drdm.sampler import DRDMSampler, RegistrationTriplet, SampleResult

__all__ = [
    "DRDMLoss",
    "DRDMSampler",
    "DeformationDiffusion",
    "ForwardSample",
    "PowerSchedule",
    "RecoveryNet",
    "RegistrationTriplet",
    "SampleResult",
    "compose",
    "diffusion",
    "fields",
    "flow_power",
    "flow_power_sequential",
    "folding_fraction",
    "io",
    "jacobian_determinant",
    "losses",
    "networks",
    "sampler",
    "trainer",
    "warp",
    "workflows",
]
