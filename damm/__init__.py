"""DAMM-Diffusion (CVPR 2025) on MONAI: networks (``damm.networks``) and losses (``damm.losses``)."""

from __future__ import annotations

__all__: list[str] = []
