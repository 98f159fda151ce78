"""Data preparation: the synthetic NP generator, converters for users' data, and datalist utilities.

Command-line tools: ``python -m data_prep.synthetic_np``, ``python -m data_prep.damm_folders``,
``python -m data_prep.brats``, ``python -m data_prep.microscopy``.
"""

from __future__ import annotations

__all__: list[str] = []
