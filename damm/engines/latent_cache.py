"""Scaled-latent dataset for the diffusion stage: encode the training images once, reuse the latents every epoch.

The spec (``damm.md`` §2.9) notes that encoding three modalities costs more than the denoiser's forward and
backward; the frozen autoencoders are therefore run once over the training set (``encode_scaled``: the
deterministic latent times the stored scale factor) and the latents are kept in memory. When the image transform
is random (e.g. a random spatial augmentation), caching is switched off and each item is encoded on access.

Encoding is lazy: it happens on the first ``__getitem__``, so building the dataset (e.g. while a bundle config is
parsed or its properties are checked) is free, and the autoencoders may be loaded or trained in between.

With ``precision="bf16"`` (or ``"fp16"`` on CUDA) the encoders run under ``torch.autocast``; the cached latents are
always fp32.

A ``latent_transform`` (e.g. a MONAI ``RandSpatialCropd`` over the modality keys: the bundle's ``dm_crop_size``)
is applied to every sample after the cache, so the denoiser can train on random latent windows of full-resolution
slices while the cache still holds whole latents.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import Compose, Randomizable, RandSpatialCropd
from torch import nn
from torch.utils.data import Dataset

from ddcore.precision import autocast, check_precision

__all__ = ["LatentCacheDataset", "has_random_transform", "latent_crop"]

logger = logging.getLogger(__name__)


def has_random_transform(transform: Callable | None) -> bool:
    """Whether a (possibly nested) MONAI transform draws random parameters.

    Args:
        transform: a transform or ``Compose``.

    Returns:
        ``True`` if any element is ``Randomizable``.
    """
    if transform is None:
        return False
    if isinstance(transform, Compose):
        return any(has_random_transform(t) for t in transform.transforms)
    return isinstance(transform, Randomizable)


def latent_crop(
    keys: Sequence[str], crop_size: Sequence[int] | None, downsampling: int, multiple: int = 1
) -> RandSpatialCropd | None:
    """The random latent window of the bundle's ``dm_crop_size``: one ``RandSpatialCropd`` window for every key.

    Args:
        keys: the modality keys cropped together.
        crop_size: the window in image pixels (``None``: no crop).
        downsampling: the autoencoder's spatial downsampling factor (image pixels per latent pixel).
        multiple: the size multiple the denoiser needs in latent pixels.

    Returns:
        The transform, or ``None`` for ``crop_size=None``.

    Raises:
        ValueError: a size that is not a positive multiple of ``downsampling * multiple``.
    """
    if crop_size is None:
        return None
    step = int(downsampling) * int(multiple)
    sizes = [int(s) for s in crop_size]
    if any(s <= 0 or s % step for s in sizes):
        raise ValueError(f"dm_crop_size: expected positive multiples of {step} image pixels, got {list(crop_size)}")
    return RandSpatialCropd(list(keys), roi_size=[s // int(downsampling) for s in sizes], random_size=False)


def _plain(x: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` (MONAI ``MetaTensor`` metadata dropped)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class LatentCacheDataset(Dataset):
    """Dataset of scaled latents ``{modality: [C_lat, *spatial]}`` (plus the item's scalar fields).

    Args:
        data: datalist items (dicts with one image path per key).
        transform: image pipeline turning an item into ``[C, *spatial]`` tensors in ``[-1, 1]`` per key.
        autoencoders: ``{modality: LatentAutoencoder}``; ``encode_scaled`` is used, so their scale factors must be
            set before the first access.
        keys: modalities to encode (target and conditions).
        device: where to encode.
        batch_size: images encoded together while building the cache.
        cache: ``True``/``False``, or ``None`` to cache unless ``transform`` is random.
        keep_fields: scalar item fields copied into every sample that has them (default ``"divergent"``: the
            synthetic data's flag, with which the trainer logs the gate labels' agreement and the confidence per
            subset).
        progress: show a progress bar while encoding.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA only): autocast dtype of the encoding.
        latent_transform: applied to each sample's ``{modality: latent}`` after the cache (default ``None``: the
            whole latents), e.g. a random crop with one window for every modality.

    Raises:
        ValueError: empty ``data`` or ``keys``, a key without autoencoder, an unknown ``precision`` or one
            ``device`` cannot run.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable,
        autoencoders: Mapping[str, nn.Module],
        keys: Sequence[str],
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        cache: bool | None = None,
        keep_fields: Sequence[str] = ("divergent",),
        progress: bool = True,
        precision: str = "fp32",
        latent_transform: Callable | None = None,
    ) -> None:
        precision = check_precision(precision, device, setting="precision")
        if len(data) == 0:
            raise ValueError("LatentCacheDataset: 'data' is empty")
        if not keys:
            raise ValueError("LatentCacheDataset: 'keys' is empty")
        missing = [k for k in keys if k not in autoencoders]
        if missing:
            raise ValueError(f"LatentCacheDataset: no autoencoder for {missing}; configured: {list(autoencoders)}")
        self.data = list(data)
        self.transform = transform
        self.autoencoders = autoencoders
        self.keys = list(keys)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.cache = (not has_random_transform(transform)) if cache is None else bool(cache)
        self.keep_fields = list(keep_fields)
        self.progress = progress
        self.precision = precision
        self.latent_transform = latent_transform
        self._latents: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def _autoencoder(self, key: str) -> nn.Module:
        ae = self.autoencoders[key]
        return getattr(ae, "module", ae)  # DDP-wrapped

    @torch.no_grad()
    def _encode(self, images: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            ae = self._autoencoder(k)
            was_training = ae.training
            ae.eval()
            try:
                x = torch.stack([_plain(i).float() for i in images[k]]).to(self.device)
                with autocast(self.precision, self.device):
                    z = ae.encode_scaled(x)
                out[k] = z.float().cpu()
            finally:
                ae.train(was_training)
        return out

    def build(self) -> dict[str, torch.Tensor]:
        """Encode the whole dataset (idempotent).

        Returns:
            ``{modality: [N, C_lat, *spatial]}`` latents.
        """
        if self._latents is not None:
            return self._latents
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        starts = range(0, len(self.data), self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encoding latents", leave=False)
        for start in starts:
            items = [self.transform(dict(d)) for d in self.data[start : start + self.batch_size]]
            enc = self._encode({k: [it[k] for it in items] for k in self.keys})
            for k in self.keys:
                chunks[k].append(enc[k])
        self._latents = {k: torch.cat(v) for k, v in chunks.items()}
        stds = {k: round(float(v.std()), 3) for k, v in self._latents.items()}
        logger.info(f"latent cache: {len(self.data)} items encoded, latent std per modality {stds}")
        return self._latents

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        if self.cache:
            latents = self.build()
            sample: dict[str, Any] = {k: latents[k][index] for k in self.keys}
        else:
            data = self.transform(dict(item))
            enc = self._encode({k: [data[k]] for k in self.keys})
            sample = {k: enc[k][0] for k in self.keys}
        if self.latent_transform is not None:
            sample = dict(self.latent_transform(sample))
            sample.update({k: _plain(sample[k]) for k in self.keys})
        for f in self.keep_fields:
            if f in item:
                sample[f] = item[f]
        return sample
