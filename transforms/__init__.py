"""MONAI dictionary transforms and ready-made pipelines for the project's data kinds.

Modules: :mod:`transforms.pipelines` (``microscopy_pipeline``, ``np_pipeline``, ``brats_volume_pipeline``,
``brats_slice_pipeline``), :mod:`transforms.intensity` (normaliser and inverse), :mod:`transforms.checks`,
:mod:`transforms.color`, :mod:`transforms.slices`, :mod:`transforms.loading`, :mod:`transforms.readers`,
:mod:`transforms.masks` and :mod:`transforms.utility`. Only MONAI dictionary transforms and pipelines live
here; they import MONAI and :mod:`ddcore`, never a method package (the DRDM augmentation transform is
:mod:`drdm.transforms`). Import from the submodules; this package file stays light.
"""

from __future__ import annotations

__all__: list[str] = []
