"""Glue the bundle configs call: the composite model, data resolution, stage runners and checkpoint export.

The bundle's ``train.json`` wires MONAI/ignite objects together; what a JSON expression cannot express cleanly
lives here:

- :class:`DAMMModel`: one ``nn.Module`` owning every modality's autoencoder and the denoiser (the single
  ``network_def`` of ``inference.json``; its state dict is ``models/model.pt``).
- :func:`build_autoencoders` / :func:`build_discriminators`: one network per modality.
- :func:`resolve_datalist` / :func:`load_split`: the embedded synthetic dataset is generated on first use; a
  user's datalist is checked for the configured modalities before anything long starts.
- :class:`TrainingStage`: run a trainer unless its stage already finished (resume comes from
  :class:`damm.engines.ResumeFromCheckpoint`), then export the stage's final model atomically.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damm.engines.handlers import is_rank_zero, load_checked_state_dict
from ddcore.atomic import atomic_torch_save

__all__ = [
    "DAMMModel",
    "TrainingStage",
    "barrier",
    "build_autoencoders",
    "build_discriminators",
    "check_splits",
    "compute_scale_factors",
    "ddp_forward_all",
    "ddp_modules",
    "export_autoencoders",
    "export_model",
    "load_autoencoders",
    "load_model",
    "load_split",
    "resolve_datalist",
]

logger = logging.getLogger(__name__)


def _info(message: str) -> None:
    """Log on rank 0 only (every rank runs the same stages under DDP)."""
    if is_rank_zero():
        logger.info(message)


# ---------------------------------------------------------------------------------------------------- model
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


def build_autoencoders(keys: Sequence[str], **kwargs: Any) -> nn.ModuleDict:
    """One :func:`damm.networks.build_autoencoder` per modality (same architecture, separate weights).

    Args:
        keys: modalities.
        **kwargs: ``build_autoencoder`` arguments.

    Returns:
        ``ModuleDict`` keyed by modality.
    """
    from damm.networks import build_autoencoder

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


# ---------------------------------------------------------------------------------------------------- distributed
def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; otherwise nothing."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _ddp(module: nn.Module, device: torch.device | str, find_unused_parameters: bool) -> nn.Module:
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module.to(device), device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def ddp_modules(
    modules: nn.ModuleDict, device: torch.device | str, find_unused_parameters: bool = True
) -> nn.ModuleDict:
    """Wrap every module of a ``ModuleDict`` in ``DistributedDataParallel`` (gloo on CPU, NCCL on GPUs).

    The wrapped dict is what the trainer uses; checkpoints keep referring to the unwrapped modules.

    Args:
        modules: e.g. the per-modality autoencoders or discriminators.
        device: this rank's device.
        find_unused_parameters: needed when some parameters get no gradient in a step.

    Returns:
        A ``ModuleDict`` of DDP wrappers (same keys).
    """
    return nn.ModuleDict({k: _ddp(m, device, find_unused_parameters) for k, m in modules.items()})


def ddp_forward_all(denoiser: nn.Module, device: torch.device | str, find_unused_parameters: bool = True) -> nn.Module:
    """``DistributedDataParallel(ForwardAll(denoiser))``: DDP over the denoiser's ``forward_all`` (both branches).

    ``find_unused_parameters`` is needed: the confidence head gets no gradient during the warm-up and the
    multi-modal branch none from samples gated to the uni-modal branch.

    Args:
        denoiser: the ``DAMMDenoiser``.
        device: this rank's device.
        find_unused_parameters: see above.

    Returns:
        The DDP wrapper (pass it as the diffusion trainer's ``network``).
    """
    from damm.engines.diffusion_trainer import ForwardAll

    return _ddp(ForwardAll(denoiser), device, find_unused_parameters)


# ---------------------------------------------------------------------------------------------------- data
def resolve_datalist(
    datalist: str | Path | None,
    dataset_dir: str | Path,
    generate_synthetic: bool = True,
    synthetic_args: Mapping[str, Any] | None = None,
) -> str:
    """The datalist to use; generates the embedded synthetic dataset first when asked and absent.

    An explicit ``datalist`` always wins (nothing is generated). Otherwise, with ``generate_synthetic`` the
    synthetic dataset is generated into ``dataset_dir`` unless already there; without it,
    ``<dataset_dir>/datalist.json`` must exist.

    Args:
        datalist: explicit datalist file (the user's data), or ``None``.
        dataset_dir: dataset folder.
        generate_synthetic: generate (``data_prep.synthetic_np.ensure_dataset``) into ``dataset_dir`` if it does
            not hold the synthetic dataset yet (rank 0 generates, other ranks wait).
        synthetic_args: generator arguments (``n``, ``size``, ``divergent_fraction``, ``seed``...).

    Returns:
        The datalist path (string).

    Raises:
        FileNotFoundError: the datalist does not exist.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    if datalist is None and generate_synthetic:
        from data_prep.synthetic_np import ensure_dataset

        args = dict(synthetic_args or {})
        if is_rank_zero():
            t0 = time.perf_counter()
            path = ensure_dataset(dataset_dir, **args)
            logger.info(f"synthetic dataset ready: {path} ({time.perf_counter() - t0:.1f} s)")
        barrier()
        if not is_rank_zero():
            path = ensure_dataset(dataset_dir, **args)
        return str(path)
    path = Path(datalist).expanduser() if datalist is not None else dataset_dir / "datalist.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"datalist not found: '{path}'. Point 'datalist' (or 'dataset_dir') at your data, or set "
            "'generate_synthetic' to true to generate the embedded synthetic dataset in 'dataset_dir'."
        )
    return str(path)


def load_split(
    datalist: str | Path,
    split: str,
    keys: Sequence[str],
    max_items: int | None = None,
    keep_fields: Sequence[str] = ("id", "divergent"),
) -> list[dict[str, Any]]:
    """Load one split (absolute, checked paths for ``keys``), optionally only its first ``max_items`` items.

    Args:
        datalist: datalist JSON.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        keys: the configured modalities (target and conditions); each item must have all of them.
        max_items: keep at most this many items (``None``/``0``: all), for quick runs.
        keep_fields: other item fields kept (when present); the rest is dropped so batches collate even when
            items carry different optional fields.

    Returns:
        Item dicts.

    Raises:
        ValueError: the datalist lacks the split or a configured modality (names the file, split and key).
        FileNotFoundError: a referenced file is missing.
    """
    from data_prep.datalist import load_datalist

    items = load_datalist(datalist, split, list(keys))
    if max_items:
        items = items[: int(max_items)]
    wanted = [*keys, *keep_fields]
    return [{k: item[k] for k in wanted if k in item} for item in items]


def check_splits(datalist: str | Path, keys: Sequence[str], splits: Sequence[str]) -> dict[str, int]:
    """Check, before any training, that every split exists and every item has an existing file for every key.

    Args:
        datalist: datalist JSON.
        keys: the configured modalities.
        splits: splits the run will use.

    Returns:
        ``{split: number of items}``.

    Raises:
        ValueError: a missing split or modality (the message names the datalist, split, item and key).
        FileNotFoundError: a missing file.
    """
    from data_prep.datalist import load_datalist

    counts = {split: len(load_datalist(datalist, split, list(keys))) for split in splits}
    logger.info(f"datalist {datalist}: {counts} items with modalities {list(keys)}")
    return counts


# ---------------------------------------------------------------------------------------------------- checkpoints
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

    factors = {}
    for k in keys or list(autoencoders):
        ae = getattr(autoencoders[k], "module", autoencoders[k])
        sf = compute_scale_factor(ae, loader, key=k, max_batches=max_batches)
        ae.set_scale_factor(sf)
        factors[k] = float(sf)
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
        _info(f"latent scale factors (1/std): { ({k: round(v, 4) for k, v in factors.items()}) }")
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


def export_model(model: nn.Module, path: str | Path) -> Path:
    """Write the composite model's state dict (autoencoders, scale factors, denoiser) atomically (rank 0).

    Args:
        model: :class:`DAMMModel`.
        path: destination (``models/model.pt``).

    Returns:
        ``path``.
    """
    if is_rank_zero():
        atomic_torch_save(_state_dict(model), path)
        logger.info(f"model written to {path}")
    barrier()
    return Path(path)


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


# ---------------------------------------------------------------------------------------------------- stages
class TrainingStage:
    """Run one training stage unless it already finished; export its final model when it completes.

    Resuming an interrupted stage is done by the trainer's :class:`damm.engines.ResumeFromCheckpoint` handler;
    this class decides whether to train at all: when ``final_path`` exists and ``retrain`` is false the stage is
    skipped (``retrain=True`` deletes the stage's checkpoints and trains from scratch).

    Args:
        name: stage name for the log.
        trainer: the ignite trainer.
        final_path: the stage's final model file; its presence marks the stage as finished.
        export: called after a successful ``trainer.run()`` to write ``final_path``.
        retrain: train again even if finished.
        checkpoint_dir: the stage's checkpoint folder (emptied when retraining).
        prepare: optional callables run before training (e.g. load the autoencoders for stage 2).
        check: optional callable run instead of training when the stage is finished; it should load the final
            model so a checkpoint from another configuration fails here, clearly, before later stages.
    """

    def __init__(
        self,
        name: str,
        trainer: Any,
        final_path: str | Path,
        export: Callable[[], Any],
        retrain: bool = False,
        checkpoint_dir: str | Path | None = None,
        prepare: Sequence[Callable[[], Any]] = (),
        check: Callable[[], Any] | None = None,
    ) -> None:
        self.name = name
        self.trainer = trainer
        self.final_path = Path(final_path)
        self.export = export
        self.retrain = bool(retrain)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.prepare = list(prepare)
        self.check = check

    def finished(self) -> bool:
        """Whether the stage's final model exists.

        Returns:
            ``True`` if ``final_path`` is a file.
        """
        return self.final_path.is_file()

    def run(self) -> bool:
        """Train (or skip) the stage.

        Returns:
            ``True`` if the stage trained, ``False`` if it was skipped.
        """
        if self.finished() and not self.retrain:
            if self.check is not None:
                self.check()
            _info(f"{self.name}: already finished ({self.final_path}); skipping. Set the retrain flag to train again.")
            return False
        if self.retrain and self.checkpoint_dir is not None and self.checkpoint_dir.is_dir() and is_rank_zero():
            shutil.rmtree(self.checkpoint_dir)
            _info(f"{self.name}: retraining from scratch (removed {self.checkpoint_dir})")
        barrier()
        for step in self.prepare:
            step()
        t0 = time.perf_counter()
        _info(f"{self.name}: training")
        self.trainer.run()
        self.export()
        _info(f"{self.name}: done in {time.perf_counter() - t0:.1f} s -> {self.final_path}")
        return True
