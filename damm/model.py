"""The composite DAMM model, its per-modality builders, and the export / checked loading of its weights.

- :class:`DAMMModel`: one ``nn.Module`` owning every modality's autoencoder and the denoiser (the single
  ``network_def`` of ``inference.json``; its state dict is ``models/model.pt``).
- :func:`build_autoencoders` / :func:`build_discriminators`: one network per modality.
- :func:`compute_scale_factors`, :func:`export_autoencoders` / :func:`load_autoencoders` (stage 1's
  ``models/model_autoencoder.pt``) and :func:`export_model` / :func:`load_model` (``models/model.pt``): written
  atomically on rank 0, loaded through :func:`ddcore.checkpoints.load_checked_state_dict` so a checkpoint of
  another configuration fails with a clear message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damm.distributed import barrier, rank_zero_info
from ddcore.atomic import atomic_torch_save
from ddcore.checkpoints import load_checked_state_dict
from ddcore.device import is_rank_zero

__all__ = [
    "DAMMModel",
    "build_autoencoders",
    "build_discriminators",
    "compute_scale_factors",
    "export_autoencoders",
    "export_model",
    "export_snapshot",
    "load_autoencoders",
    "load_model",
    "snapshot_path",
]

logger = logging.getLogger(__name__)


class DAMMModel(nn.Module):
    """The whole DAMM-Diffusion model: one latent autoencoder per modality plus the two-branch denoiser.

    Args:
        autoencoders: ``{modality: LatentAutoencoder}`` holding the target and every condition.
        denoiser: the ``DAMMDenoiser``.
        target: the synthesised modality.
        conditions: the condition modalities, anchor (uni-modal branch) first.

    Raises:
        ValueError: a modality without autoencoder, or a condition count that does not match the denoiser.
    """

    def __init__(
        self, autoencoders: Mapping[str, nn.Module], denoiser: nn.Module, target: str, conditions: Sequence[str]
    ) -> None:
        super().__init__()
        conditions = list(conditions)
        missing = [k for k in [target, *conditions] if k not in autoencoders]
        if missing:
            raise ValueError(f"DAMMModel: no autoencoder for {missing}; configured: {list(autoencoders)}")
        n_aux = getattr(denoiser, "num_auxiliary", len(conditions) - 1)
        if len(conditions) != 1 + int(n_aux):
            raise ValueError(
                f"DAMMModel: {len(conditions)} conditions {conditions} but the denoiser expects 1 anchor + {n_aux} "
                "auxiliary modalities"
            )
        self.autoencoders = autoencoders if isinstance(autoencoders, nn.ModuleDict) else nn.ModuleDict(autoencoders)
        self.denoiser = denoiser
        self.target = target
        self.conditions = conditions

    @property
    def modalities(self) -> list[str]:
        """Target first, then the conditions."""
        return [self.target, *self.conditions]

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The denoiser's single-tensor prediction (sampling lives in :class:`damm.inferers.DAMMInferer`).

        Args:
            x: ``cat([x_t, z_anchor, z_aux...], dim=1)``.
            timesteps: ``[B]``.
            context: must be ``None``.

        Returns:
            The predicted noise.
        """
        return self.denoiser(x, timesteps, context)


def build_autoencoders(keys: Sequence[str], shared: bool = False, **kwargs: Any) -> nn.ModuleDict:
    """The modalities' autoencoders: one per modality (the paper), or one shared by all (``shared``).

    A shared autoencoder sees every modality's images at every step (with four MRI contrasts, 4x the data of a
    per-modality one); it is the same module under every key, so everything that indexes the autoencoders by
    modality works unchanged, its parameters count once (``parameters()`` deduplicates) and its latent scale
    factor is fitted on all modalities (:func:`compute_scale_factors`).

    Args:
        keys: modalities.
        shared: one autoencoder for all modalities.
        **kwargs: ``build_autoencoder`` arguments.

    Returns:
        ``ModuleDict`` keyed by modality.
    """
    from damm.networks import build_autoencoder

    if shared:
        one = build_autoencoder(**kwargs)
        return nn.ModuleDict(dict.fromkeys(keys, one))
    return nn.ModuleDict({k: build_autoencoder(**kwargs) for k in keys})


def build_discriminators(keys: Sequence[str], enabled: bool = True, **kwargs: Any) -> nn.ModuleDict | None:
    """One patch discriminator per modality (``None`` when disabled).

    Args:
        keys: modalities.
        enabled: ``False`` returns ``None`` (no adversarial term).
        **kwargs: :func:`damm.networks.build_discriminator` arguments.

    Returns:
        ``ModuleDict`` or ``None``.
    """
    if not enabled:
        return None
    from damm.networks import build_discriminator

    return nn.ModuleDict({k: build_discriminator(**kwargs) for k in keys})


@torch.no_grad()
def compute_scale_factors(
    autoencoders: Mapping[str, nn.Module],
    loader: Any,
    keys: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Set every autoencoder's latent scale factor to ``1 / std`` of its training latents.

    Args:
        autoencoders: ``{modality: LatentAutoencoder}`` (possibly DDP-wrapped).
        loader: iterable of dict batches holding each modality's image.
        keys: modalities (default: all).
        max_batches: use at most this many batches.

    Returns:
        ``{modality: scale factor}``.
    """
    from damm.networks import compute_scale_factor

    factors: dict[str, float] = {}
    groups: dict[int, list[str]] = {}  # a shared autoencoder serves several modalities: one factor for all
    for k in keys or list(autoencoders):
        ae = getattr(autoencoders[k], "module", autoencoders[k])
        factors[k] = float(compute_scale_factor(ae, loader, key=k, max_batches=max_batches))
        groups.setdefault(id(ae), []).append(k)
    for members in groups.values():
        ae = getattr(autoencoders[members[0]], "module", autoencoders[members[0]])
        # 1 / std of the pooled latents (equal counts per modality): sqrt of the mean variance
        pooled = float(len(members) / sum(1.0 / factors[k] ** 2 for k in members)) ** 0.5
        ae.set_scale_factor(pooled)
        factors.update(dict.fromkeys(members, pooled))
    return factors


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def export_autoencoders(
    autoencoders: nn.Module,
    path: str | Path,
    loader: Any = None,
    keys: Sequence[str] | None = None,
    max_batches: int | None = None,
) -> Path:
    """Compute the scale factors (when ``loader`` is given) and write the autoencoders' state atomically.

    Args:
        autoencoders: ``ModuleDict`` of autoencoders.
        path: destination (``models/model_autoencoder.pt``).
        loader: training batches for the scale factors, or ``None`` to keep the current ones.
        keys: modalities for the scale factors.
        max_batches: batches used for the scale factors.

    Returns:
        ``path``.
    """
    if loader is not None:
        factors = compute_scale_factors(autoencoders, loader, keys, max_batches)
        rank_zero_info(logger, f"latent scale factors (1/std): { ({k: round(v, 4) for k, v in factors.items()}) }")
    if is_rank_zero():
        state = _state_dict(_unwrap_dict(autoencoders))
        atomic_torch_save(state, path)
        logger.info(f"autoencoders written to {path}")
    barrier()
    return Path(path)


def _unwrap_dict(modules: nn.Module) -> nn.Module:
    if isinstance(modules, nn.ModuleDict):
        return nn.ModuleDict({k: getattr(m, "module", m) for k, m in modules.items()})
    return getattr(modules, "module", modules)


def load_autoencoders(autoencoders: nn.Module, path: str | Path) -> nn.Module:
    """Load ``model_autoencoder.pt`` (weights and scale factors) after checking it matches the configuration.

    Args:
        autoencoders: the configured ``ModuleDict``.
        path: checkpoint.

    Returns:
        ``autoencoders`` (loaded, in eval mode).

    Raises:
        FileNotFoundError: the checkpoint is missing (train stage 1 first).
        ValueError: the checkpoint was written by another configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"autoencoder checkpoint '{path}' not found: run the 'train_autoencoder' (or 'training') run id first"
        )
    target = _unwrap_dict(autoencoders)
    load_checked_state_dict(target, path, what="autoencoders")
    autoencoders.eval()
    return autoencoders


def export_model(model: nn.Module, path: str | Path, ema: Any = None) -> Path:
    """Write the composite model's state dict (autoencoders, scale factors, denoiser) atomically (rank 0).

    Args:
        model: :class:`DAMMModel`.
        path: destination (``models/model.pt``).
        ema: optional :class:`damm.engines.ema.WeightEMA` of the denoiser: its averaged weights are written, and
            copied into ``model.denoiser`` so that what follows in this process (the evaluation) samples with
            them too (the stage-2 checkpoint keeps the raw weights for resuming).

    Returns:
        ``path``.
    """
    if ema is not None and ema.copy_to(getattr(model.denoiser, "module", model.denoiser)):
        rank_zero_info(logger, f"denoiser: exporting the EMA weights ({ema.num_updates} updates, decay {ema.decay})")
    if is_rank_zero():
        atomic_torch_save(_state_dict(model), path)
        logger.info(f"model written to {path}")
    barrier()
    return Path(path)


def snapshot_path(model_path: str | Path, iteration: int) -> Path:
    """Where a training snapshot of ``model_path`` lies: ``model_iteration=<n>.pt`` beside it.

    Args:
        model_path: the final model (``models/model.pt``).
        iteration: the snapshot's iteration.

    Returns:
        The path.
    """
    path = Path(model_path)
    return path.with_name(f"{path.stem}_iteration={int(iteration)}{path.suffix}")


def export_snapshot(model: nn.Module, model_path: str | Path, iteration: int, ema: Any = None) -> Path:
    """Write the composite model as it would be exported now (EMA weights when given) to :func:`snapshot_path`,
    leaving the training weights untouched.

    Args:
        model: :class:`DAMMModel`.
        model_path: the final model's path.
        iteration: the current iteration.
        ema: optional :class:`damm.engines.ema.WeightEMA` of the denoiser.

    Returns:
        The snapshot's path.
    """
    path = snapshot_path(model_path, iteration)
    if is_rank_zero():
        state = _state_dict(model) if ema is None else ema.state_dict_for(_unwrap_dict(model), "denoiser.")
        atomic_torch_save(state, path)
    barrier()
    return path


def load_model(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``models/model.pt`` into a :class:`DAMMModel` after checking it matches the configuration.

    Args:
        model: the configured model.
        path: checkpoint.

    Returns:
        ``model`` in eval mode.

    Raises:
        FileNotFoundError: missing checkpoint.
        ValueError: checkpoint from another configuration.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint '{path}' not found: run the 'training' run id first")
    load_checked_state_dict(model, path, what="DAMM model (autoencoders + denoiser)")
    model.eval()
    return model
