"""Real-data tasks on top of the DAMM-Diffusion bundle: BraTS modality synthesis and microscopy channel prediction.

- :mod:`damm.tasks.brats`: slice training data, whole-subject inference back on the input grid, masked metrics.
- :mod:`damm.tasks.impute`: ``python -m damm.tasks.impute SUBJECT_DIR`` writes a missing modality.
- :mod:`damm.tasks.microscopy`: tiled training data, whole-field sliding-window inference, TIFF output.
- :mod:`damm.tasks.baseline`: the deterministic MONAI ``UNet`` L1-regression baseline.
- :mod:`damm.tasks.metrics`: masked PSNR / SSIM / MAE.
"""

from __future__ import annotations

__all__ = ["baseline", "brats", "common", "impute", "metrics", "microscopy"]
