"""Real-data tasks on top of the DAMM-Diffusion bundle: BraTS modality synthesis and microscopy channel prediction.

Both tasks implement one protocol, :class:`damm.tasks.protocol.RealDataTask` (data preparation, prediction,
writing, evaluation), and share its runners (:func:`~damm.tasks.protocol.evaluate`,
:func:`~damm.tasks.protocol.synthesise_to_file`, :class:`~damm.tasks.protocol.TaskInference`).

- :mod:`damm.tasks.protocol`: the protocol and the code that runs it for any task.
- :mod:`damm.tasks.common`: predictors (DAMM, autoencoder ceiling), time budget, intensity references, results.
- :mod:`damm.tasks.brats` (entry points used by the bundle) with :mod:`~damm.tasks.brats_files` (naming schemes,
  subject discovery, header-only grid check), :mod:`~damm.tasks.brats_volume` (held-out slab, whole-volume
  prediction, back to the input grid), :mod:`~damm.tasks.brats_subject` (one subject) and
  :mod:`~damm.tasks.brats_data` (the task data).
- :mod:`damm.tasks.impute`: ``python -m damm.tasks.impute SUBJECT_DIR`` writes a missing modality.
- :mod:`damm.tasks.microscopy` (entry points) with :mod:`~damm.tasks.microscopy_files` (field discovery, channel
  reading, tile offsets) and :mod:`~damm.tasks.microscopy_data` (the task data, whole-field prediction).
- :mod:`damm.tasks.baseline`: the deterministic MONAI ``UNet`` L1-regression baseline.
- :mod:`damm.tasks.trivial`: trivial baselines (each condition mapped to the target by a Huber line or a quantile
  mapping, fitted on the training items).
- :mod:`damm.tasks.metrics`: masked PSNR / SSIM / MAE.
"""

from __future__ import annotations

__all__ = [
    "baseline",
    "brats",
    "brats_data",
    "brats_files",
    "brats_subject",
    "brats_volume",
    "common",
    "impute",
    "metrics",
    "microscopy",
    "microscopy_data",
    "microscopy_files",
    "protocol",
    "trivial",
]
