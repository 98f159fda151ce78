"""Single-tensor export wrappers of the composite DAMM model, for MONAI's ``verify_net_in_out`` and ``ckpt_export``.

MONAI's bundle tools feed one tensor to the network and, for ``ckpt_export --use_trace True``, trace it with
that one tensor. The DAMM model takes a latent *and* timesteps, and each autoencoder returns a tuple in training
mode. These wrappers give each piece a one-tensor, deterministic ``forward`` while owning the *same* submodules
(``autoencoders``, ``denoiser``) as :class:`damm.model.DAMMModel`, so ``models/model.pt`` loads into them strictly:

- :class:`DenoiserExport`: ``forward(x)`` with ``x = cat([x_t, z_anchor, z_aux..., t])``; the last channel holds
  the timestep (any float in ``[0, num_train_timesteps)``, constant over space; its spatial mean is used).
  Returns the gated noise prediction, exactly ``denoiser(x[:, :-1], t)``.
- :class:`AutoencoderExport`: ``forward(image)`` = ``decode(encode(image))`` of one modality (KL: the posterior
  mean, VQ: snapped to the codebook), no sampling.

The export is a trace (``torch.jit.trace``): the fp32 islands of ``ddcore.precision`` (autocast switches) are
evaluated in Python while tracing and leave no trace in the graph, so the exported module is the fp32 network.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AutoencoderExport", "DenoiserExport"]


class _Composite(nn.Module):
    """Holds the composite model's submodules under the composite's names (same state-dict keys)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ("autoencoders", "denoiser"):
            if not hasattr(model, name):
                raise TypeError(f"{type(self).__name__} wraps a damm.model.DAMMModel; '{name}' missing")
        self.autoencoders = model.autoencoders
        self.denoiser = model.denoiser


class DenoiserExport(_Composite):
    """The DAMM denoiser as a one-tensor network: the timestep travels as the last input channel.

    Args:
        model: a :class:`damm.model.DAMMModel`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gated noise prediction.

        Args:
            x: ``[B, (2 + K) * C_lat + 1, *latent_spatial]``: the denoiser input with one timestep channel appended.

        Returns:
            ``[B, C_lat, *latent_spatial]``, the prediction of ``denoiser(x[:, :-1], t)``.
        """
        t = x[:, -1].flatten(1).mean(dim=1)
        return self.denoiser(x[:, :-1], t)


class AutoencoderExport(_Composite):
    """One modality's autoencoder as a deterministic image-to-image network (encode, then decode).

    Args:
        model: a :class:`damm.model.DAMMModel`.
        modality: which modality's autoencoder.

    Raises:
        KeyError: an unknown modality.
    """

    def __init__(self, model: nn.Module, modality: str) -> None:
        super().__init__(model)
        if modality not in self.autoencoders:
            raise KeyError(f"AutoencoderExport: no autoencoder '{modality}'; configured: {list(self.autoencoders)}")
        self.modality = modality

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``image``.

        Args:
            image: ``[B, 1, *spatial]`` in [-1, 1].

        Returns:
            The reconstruction, same shape.
        """
        ae = self.autoencoders[self.modality]
        return ae.decode(ae.encode(image))
