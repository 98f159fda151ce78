"""The project's low-level core: plumbing shared by DAMM, DRDM, the transforms and the tools.

Modules: :mod:`ddcore.precision` (fp32 / bf16 / fp16 autocast, fp32 norm layers, grad scaler, non-finite
step skipping), :mod:`ddcore.atomic` (crash-safe writers), :mod:`ddcore.checkpoints` (checkpoint naming,
discovery, saving and checked loading), :mod:`ddcore.datalist` (MONAI datalist reading with the project's
checks), :mod:`ddcore.device`. Nothing here imports another package of the project; everything else may
import from here. Import from the submodules; this package file stays light.
"""

from __future__ import annotations

__all__: list[str] = []
