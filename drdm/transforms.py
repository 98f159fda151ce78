"""MONAI dictionary transform applying learned DRDM deformations as data augmentation.

``RandDRDMDeformd`` draws its random parameters (whether to apply, the start level ``T'`` and the seed of the
random field) in :meth:`~RandDRDMDeformd.randomize` and applies them in ``__call__``: the first image key drives
the recovery network (Algorithm 2), and the resulting field ``φ`` warps every image key (bi/trilinear) and every
label key (label-safe: nearest or one-hot + argmax, so no new label value can appear). Works on channel-first
2D ``[C, H, W]`` and 3D ``[C, H, W, D]`` items inside any :class:`monai.transforms.Compose`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, ScaleIntensityRangePercentiles
from monai.utils import convert_to_dst_type, convert_to_tensor

from ddcore.device import module_device
from drdm.sampler import DRDMSampler, check_labels, warp_intensities, warp_labels

__all__ = ["RandDRDMDeformd"]


class RandDRDMDeformd(RandomizableTransform, MapTransform):
    """Deform images and labels with a DRDM sample (random start field + learned recovery).

    Args:
        keys: image keys (the first one drives the network; all are warped with the same field).
        sampler: a :class:`drdm.sampler.DRDMSampler` holding the trained network and forward process.
        label_keys: integer label-map keys warped label-safely.
        t_prime: candidate start levels (one is drawn uniformly per call), each in ``[1, T]``.
        prob: probability of applying the deformation.
        normalise: scale the driving image to [0, 1] by percentiles (as in training) before the network.
        lower_percentile: lower percentile of that scaling.
        upper_percentile: upper percentile.
        ddf_key: when set, the field ``φ`` ``[d, *S]`` (voxels) is stored under this key (zeros when skipped).
        allow_missing_keys: do not fail on missing keys.

    Raises:
        ValueError: a start level outside ``[1, T]`` (at construction); labels on another grid than the image or
            non-integer labels (at call).
    """

    def __init__(
        self,
        keys: KeysCollection,
        sampler: DRDMSampler,
        label_keys: KeysCollection = (),
        t_prime: int | Sequence[int] = (16, 24, 32),
        prob: float = 1.0,
        normalise: bool = True,
        lower_percentile: float = 0.5,
        upper_percentile: float = 99.5,
        ddf_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.sampler = sampler
        self.label_keys: tuple[Hashable, ...] = (
            (label_keys,) if isinstance(label_keys, (str, int)) else tuple(label_keys)  # type: ignore[arg-type]
        )
        levels = [t_prime] if isinstance(t_prime, int) else list(t_prime)
        if not levels:
            raise ValueError("RandDRDMDeformd: t_prime needs at least one start level.")
        self.t_primes = [sampler.check_t_prime(t) for t in levels]
        self.normalise = normalise
        self._scaler = ScaleIntensityRangePercentiles(lower_percentile, upper_percentile, 0.0, 1.0, clip=True)
        self.ddf_key = ddf_key
        self._t_prime = self.t_primes[0]
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, the start level and the seed of the random field."""
        super().randomize(None)
        self._t_prime = int(self.R.choice(self.t_primes))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any], randomize: bool = True) -> dict[Hashable, Any]:
        """Apply the transform (drawing new parameters unless ``randomize`` is False)."""
        d = dict(data)
        if randomize:
            self.randomize()
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        driver = convert_to_tensor(d[keys[0]], track_meta=False)
        if driver.ndim not in (3, 4):
            raise ValueError(
                f"RandDRDMDeformd: {keys[0]!r} must be channel-first [C, *S] (2D or 3D), got {tuple(driver.shape)}."
            )
        spatial = driver.shape[1:]
        labels = {}
        for key in self.label_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"RandDRDMDeformd: label key {key!r} missing from the item.")
            lab = convert_to_tensor(d[key], track_meta=False)
            check_labels(lab[None], driver[None], name=f"label {key!r}")
            labels[key] = lab
        if not self._do_transform:
            if self.ddf_key:
                d[self.ddf_key] = torch.zeros((len(spatial), *spatial), dtype=torch.float32)
            return d
        network = self.sampler.network
        device = module_device(network)
        in_ch = int(getattr(network, "in_channels", driver.shape[0]))
        net_in = driver[:in_ch].float()
        if self.normalise:
            net_in = convert_to_tensor(self._scaler(net_in), dtype=torch.float32, track_meta=False)
        generator = torch.Generator().manual_seed(self._seed)
        result = self.sampler.sample(net_in[None].to(device), self._t_prime, None, generator)
        ddf = result.ddf
        for key in keys:
            img = convert_to_tensor(d[key], track_meta=False)
            x = img.float().to(device)[None]
            out = warp_intensities(x, ddf, self.sampler.image_mode)[0]
            d[key], *_ = convert_to_dst_type(out.cpu(), d[key], dtype=img.dtype if img.is_floating_point() else None)
        for key, lab in labels.items():
            out = warp_labels(lab[None].to(device), ddf, self.sampler.label_mode, self.sampler.label_padding_mode)[0]
            d[key], *_ = convert_to_dst_type(out.cpu(), d[key], dtype=lab.dtype)
        if self.ddf_key:
            d[self.ddf_key] = ddf[0].cpu()
        return d
