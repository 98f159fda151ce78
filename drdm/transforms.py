"""MONAI dictionary transform applying learned DRDM deformations as data augmentation, invertibly.

``RandDRDMDeformd`` draws its random parameters (whether to apply, the start level ``T'`` and the seed of the
random field) in :meth:`~RandDRDMDeformd.randomize` and applies them in ``__call__``: the first image key drives
the recovery network (Algorithm 2), and the resulting field ``φ`` warps every image key (bi/trilinear) and every
label key (label-safe: nearest or one-hot + argmax, so no new label value can appear). Works on channel-first
2D ``[C, H, W]`` and 3D ``[C, H, W, D]`` items inside any :class:`monai.transforms.Compose`.

It is a :class:`monai.transforms.InvertibleTransform`: every key gets an ``applied_operations`` entry holding
``φ``, and :meth:`~RandDRDMDeformd.inverse` (or :class:`monai.transforms.Invertd`) warps with the inverse field
(:func:`drdm.fields.invert_field`; images bi/trilinear, label keys nearest).

Speed: one fresh field costs one network pass per recovery step (``T'`` steps with ``start="t_prime"``).
``bank_size > 0`` switches on a **field bank** (fields generated once per image and reused, see the class
docstring); ``DRDMSampler(recovery_stride=s)`` makes each field about ``s`` times cheaper (approximate recovery).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, RandomizableTransform, ScaleIntensityRangePercentiles
from monai.utils import TraceKeys, convert_to_dst_type, convert_to_tensor

from ddcore.device import module_device
from drdm.fields import invert_field, warp
from drdm.sampler import DRDMSampler, check_labels, warp_intensities, warp_labels

__all__ = ["RandDRDMDeformd"]


def _digest(*parts: Any) -> str:
    """Hex digest of byte strings / numbers (content keys and bank seeds)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()


class RandDRDMDeformd(RandomizableTransform, MapTransform, InvertibleTransform):
    """Deform images and labels with a DRDM sample (random start field + learned recovery); invertible.

    **Field bank** (``bank_size > 0``): the first call on an image (keyed by its shape, dtype and a hash of the
    driving channels' content) generates ``bank_size`` fields per distinct start level in one batched
    :meth:`DRDMSampler.augment` call; every call then picks one of them (the drawn ``T'`` picks the level, the
    drawn seed the slot) and only warps. After ``refresh_every`` draws from an image's bank (0: never) it is
    regenerated (next generation, new fields), synchronously inside that call. The banks of the
    ``bank_capacity`` most recently used images are kept (least recently used dropped first).

    Trade-off: a bank call costs one warp per key (milliseconds) instead of ``T'`` network passes (seconds), but an
    image then only ever sees ``bank_size`` x levels distinct fields per generation; the amortised cost per call is
    about ``bank_size · levels · (cost of one field) / refresh_every``, so the ratio ``refresh_every / (bank_size ·
    levels)`` is both the speed-up and the number of times each field is reused. Memory: ``bank_size · levels``
    fields of ``d · |S|`` float32 per image kept (3D 128x128x32: 6.3 MB per field). Each DataLoader worker keeps
    its own banks. ``bank_size = 0`` (default) keeps the original behaviour: a fresh field per call.

    Reproducibility (as TorchIO): ``randomize`` draws everything from the transform's RNG; the same seed
    (:meth:`set_random_state`, which also clears the banks) and the same sequence of calls give the same outputs.
    Bank fields are seeded from the RNG's state at seeding time, the image's content hash and the generation.

    Inverse: ``applied_operations`` of every image and label key holds the field ``φ`` (``extra_info["ddf"]``,
    ``[d, *S]`` voxels, on the CPU). :meth:`inverse` computes ``φ⁻¹`` by ``inverse_iterations`` fixed-point steps
    (:func:`drdm.fields.invert_field`) and warps images bi/trilinearly, label keys nearest (no new values); a
    skipped call (``prob``) inverts to the identity. What ``φ`` pulled from outside the grid (background) and the
    interpolation blur of the two warps are not recovered: the round trip is close away from the border only.

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
        bank_size: fields kept per image and start level (0: no bank, a fresh field per call).
        refresh_every: draws from an image's bank before it is regenerated (0: never).
        bank_capacity: images whose banks are kept.
        inverse_iterations: fixed-point iterations of the inverse field.

    Raises:
        ValueError: a start level outside ``[1, T]`` or a negative bank setting (at construction); labels on
            another grid than the image or non-integer labels (at call).
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
        bank_size: int = 0,
        refresh_every: int = 0,
        bank_capacity: int = 16,
        inverse_iterations: int = 20,
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
        for name, value, low in (
            ("bank_size", bank_size, 0),
            ("refresh_every", refresh_every, 0),
            ("bank_capacity", bank_capacity, 1),
            ("inverse_iterations", inverse_iterations, 0),
        ):
            if isinstance(value, bool) or int(value) != value or int(value) < low:
                raise ValueError(f"RandDRDMDeformd: {name} must be an integer >= {low}, got {value!r}.")
        self.bank_size, self.refresh_every = int(bank_size), int(refresh_every)
        self.bank_capacity, self.inverse_iterations = int(bank_capacity), int(inverse_iterations)
        self.bank_levels = list(dict.fromkeys(self.t_primes))  # distinct levels, first-appearance order
        self.normalise = normalise
        self._scaler = ScaleIntensityRangePercentiles(lower_percentile, upper_percentile, 0.0, 1.0, clip=True)
        self.ddf_key = ddf_key
        self._t_prime = self.t_primes[0]
        self._seed = 0
        self._banks: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._bank_seed = self._state_seed()

    # ------------------------------------------------------------------ randomness
    def _state_seed(self) -> str:
        """A digest of the RNG's current state (seeds the banks without consuming draws)."""
        return _digest(np.asarray(self.R.get_state()[1]).tobytes())

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandDRDMDeformd:
        """Seed the transform's RNG (as MONAI) and clear the field banks, so a seed reproduces a run."""
        super().set_random_state(seed, state)
        self._bank_seed = self._state_seed()
        self._banks.clear()
        return self

    def bank_fields(self) -> dict[int, list[torch.Tensor]]:
        """The fields the banks hold now, per start level: ``{T': [fields of one image [bank_size, d, *S], ...]}``
        (voxels, one tensor per banked image); ``{}`` without a bank or before the first call."""
        out: dict[int, list[torch.Tensor]] = {}
        for entry in self._banks.values():
            for i, level in enumerate(self.bank_levels):
                out.setdefault(level, []).append(entry["fields"][i * self.bank_size : (i + 1) * self.bank_size])
        return out

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply, the start level and the seed of the random field (the bank slot)."""
        super().randomize(None)
        self._t_prime = int(self.R.choice(self.t_primes))
        self._seed = int(self.R.randint(0, 2**31 - 1))

    # ------------------------------------------------------------------ fields
    def _net_input(self, driver: torch.Tensor, device: torch.device) -> torch.Tensor:
        in_ch = int(getattr(self.sampler.network, "in_channels", driver.shape[0]))
        net_in = driver[:in_ch].float()
        if self.normalise:
            net_in = convert_to_tensor(self._scaler(net_in), dtype=torch.float32, track_meta=False)
        return net_in[None].to(device)

    def _bank_field(self, driver: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
        """The bank field for the drawn ``(T', seed)`` and the bank generation it comes from."""
        in_ch = int(getattr(self.sampler.network, "in_channels", driver.shape[0]))
        content = driver[:in_ch].detach().cpu().contiguous()
        key = (tuple(driver.shape), str(driver.dtype), _digest(content.numpy().tobytes()))
        entry = self._banks.get(key)
        if entry is None or (self.refresh_every and entry["draws"] >= self.refresh_every):
            generation = 0 if entry is None else entry["generation"] + 1
            seed = int(_digest(self._bank_seed, key, generation)[:15], 16)
            generator = torch.Generator().manual_seed(seed)
            net_in = self._net_input(driver, device)
            results = self.sampler.augment(net_in, self.bank_levels, self.bank_size, None, generator)
            entry = {"fields": torch.cat([r.ddf for r in results]), "draws": 0, "generation": generation}
            self._banks[key] = entry
        self._banks.move_to_end(key)
        while len(self._banks) > self.bank_capacity:
            self._banks.popitem(last=False)
        entry["draws"] += 1
        slot = self.bank_levels.index(self._t_prime) * self.bank_size + self._seed % self.bank_size
        return entry["fields"][slot : slot + 1], int(entry["generation"])

    def _field(self, driver: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The field ``φ`` ``[1, d, *S]`` for the drawn parameters, and what to record about it."""
        device = module_device(self.sampler.network)
        info: dict[str, Any] = {"t_prime": self._t_prime, "seed": self._seed}
        if self.bank_size:
            ddf, info["bank_generation"] = self._bank_field(driver, device)
            return ddf, info
        generator = torch.Generator().manual_seed(self._seed)
        return self.sampler.sample(self._net_input(driver, device), self._t_prime, None, generator).ddf, info

    # ------------------------------------------------------------------ forward / inverse
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
            for key in [*keys, *labels]:
                if isinstance(d[key], MetaTensor):  # never record onto the caller's tensor
                    d[key] = d[key].clone()
                d = self.push_transform(d, key, extra_info={"kind": "label" if key in labels else "image"})
            if self.ddf_key:
                d[self.ddf_key] = torch.zeros((len(spatial), *spatial), dtype=torch.float32)
            return d
        ddf, info = self._field(driver)
        field = ddf[0].cpu()
        for key in keys:
            img = convert_to_tensor(d[key], track_meta=False)
            out = warp_intensities(img.float().to(ddf.device)[None], ddf, self.sampler.image_mode)[0]
            d[key], *_ = convert_to_dst_type(out.cpu(), d[key], dtype=img.dtype if img.is_floating_point() else None)
            d = self.push_transform(d, key, extra_info={**info, "kind": "image", "ddf": field})
        for key, lab in labels.items():
            out = warp_labels(lab[None].to(ddf.device), ddf, self.sampler.label_mode, self.sampler.label_padding_mode)
            d[key], *_ = convert_to_dst_type(out[0].cpu(), d[key], dtype=lab.dtype)
            d = self.push_transform(d, key, extra_info={**info, "kind": "label", "ddf": field})
        if self.ddf_key:
            d[self.ddf_key] = field
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Undo the deformation on every image and label key present (identity where it was skipped).

        Images are warped bi/trilinearly with ``φ⁻¹``, label keys nearest (any dtype, values kept as they are,
        so :class:`monai.transforms.Invertd` can also map a prediction through a label key's operations).
        """
        d = dict(data)
        inverses: dict[int, torch.Tensor] = {}  # one inverse field per recorded field
        for key in dict.fromkeys((*self.keys, *self.label_keys)):
            if key not in d:
                continue
            op = self.pop_transform(d, key)
            if not op[TraceKeys.DO_TRANSFORM]:
                continue
            extra = op[TraceKeys.EXTRA_INFO]
            ddf = convert_to_tensor(extra["ddf"], dtype=torch.float32, track_meta=False)[None]
            if id(extra["ddf"]) not in inverses:
                inverses[id(extra["ddf"])] = invert_field(ddf, self.inverse_iterations, self.sampler.field_padding_mode)
            inv = inverses[id(extra["ddf"])]
            value = convert_to_tensor(d[key], track_meta=False)
            if value.shape[1:] != inv.shape[2:]:
                raise ValueError(
                    f"RandDRDMDeformd.inverse: {key!r} has shape {tuple(value.shape)}, the recorded field "
                    f"{tuple(inv.shape[1:])}; it must be [C, *S] on the field's grid."
                )
            x = value.float()[None]
            if extra.get("kind") == "label":
                out = warp(x, inv, "nearest", self.sampler.label_padding_mode)[0]
                d[key], *_ = convert_to_dst_type(out, d[key], dtype=value.dtype)
            else:
                out = warp_intensities(x, inv, self.sampler.image_mode)[0]
                dtype = value.dtype if value.is_floating_point() else None
                d[key], *_ = convert_to_dst_type(out, d[key], dtype=dtype)
        return d
