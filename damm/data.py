"""The DAMM bundle's data resolution on top of :mod:`ddcore.datalist`: which datalist, which split, checked early.

- :func:`resolve_datalist`: an explicit datalist wins; otherwise the dataset folder's ``datalist.json``, generated
  first by a given generator (the bundle passes the offline tool ``data_prep.synthetic_np.ensure_dataset``; the
  runtime never imports ``data_prep`` itself) when asked and absent.
- :func:`load_split` / :func:`check_splits`: :func:`ddcore.datalist.load_datalist` for the configured modalities
  (absolute, existing paths), so a wrong datalist fails before anything long starts.
- :func:`check_batches`: the training split fills at least one batch of every stage (the loaders drop the last
  partial batch), so a too small dataset fails before stage 1 instead of after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from damm.distributed import barrier
from ddcore.datalist import load_datalist
from ddcore.device import is_rank_zero

__all__ = ["check_batches", "check_splits", "load_split", "resolve_datalist"]

logger = logging.getLogger(__name__)


def resolve_datalist(
    datalist: str | Path | None,
    dataset_dir: str | Path,
    generate_synthetic: bool = True,
    synthetic_args: Mapping[str, Any] | None = None,
    generator: Callable[..., str | Path] | None = None,
) -> str:
    """The datalist to use; generates the embedded synthetic dataset first when asked and absent.

    An explicit ``datalist`` always wins (nothing is generated). Otherwise, with ``generate_synthetic``,
    ``generator(dataset_dir, **synthetic_args)`` generates the dataset into ``dataset_dir`` unless already there
    (it must be idempotent and return the datalist path); without it, ``<dataset_dir>/datalist.json`` must exist.

    Args:
        datalist: explicit datalist file (the user's data), or ``None``.
        dataset_dir: dataset folder.
        generate_synthetic: call ``generator`` on ``dataset_dir`` (rank 0 generates, the other ranks wait, then
            call it too to get the path).
        synthetic_args: generator arguments (``n``, ``size``, ``divergent_fraction``, ``seed``...).
        generator: the dataset generator, e.g. ``data_prep.synthetic_np.ensure_dataset`` (passed by ``train.json``);
            required when ``generate_synthetic`` is true and no ``datalist`` is given.

    Returns:
        The datalist path (string).

    Raises:
        FileNotFoundError: the datalist does not exist.
        ValueError: generation was asked for without a ``generator``.
    """
    dataset_dir = Path(dataset_dir).expanduser()
    if datalist is None and generate_synthetic:
        if generator is None:
            raise ValueError(
                "resolve_datalist: 'generate_synthetic' is true but no 'generator' was given; pass one "
                "(e.g. data_prep.synthetic_np.ensure_dataset) or point 'datalist' at your data"
            )
        args = dict(synthetic_args or {})
        if is_rank_zero():
            t0 = time.perf_counter()
            path = generator(dataset_dir, **args)
            logger.info(f"synthetic dataset ready: {path} ({time.perf_counter() - t0:.1f} s)")
        barrier()
        if not is_rank_zero():
            path = generator(dataset_dir, **args)
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
    counts = {split: len(load_datalist(datalist, split, list(keys))) for split in splits}
    logger.info(f"datalist {datalist}: {counts} items with modalities {list(keys)}")
    return counts


def check_batches(
    datalist: str | Path,
    keys: Sequence[str],
    batch_sizes: Mapping[str, int],
    max_items: int | None = None,
    split: str = "training",
) -> int:
    """Check that ``split`` holds at least one full batch for every batch-size setting.

    Args:
        datalist: datalist JSON.
        keys: the configured modalities.
        batch_sizes: ``{setting name: batch size}``, e.g. ``{"ae_batch_size": 16, "dm_batch_size": 32}``.
        max_items: the run's item limit for the split (``None``/``0``: all).
        split: the split the trainers read.

    Returns:
        The number of items the trainers will see.

    Raises:
        ValueError: naming the datalist, the split, its size and the settings it cannot fill (the trainers'
            loaders drop the last partial batch, so such a stage would train zero iterations).
    """
    n = len(load_split(datalist, split, keys, max_items))
    short = {name: int(size) for name, size in batch_sizes.items() if int(size) > n}
    if short:
        limit = f" (limited by max_train_items={max_items})" if max_items else ""
        raise ValueError(
            f"datalist {datalist}: split {split!r} has {n} item(s){limit}, fewer than "
            + ", ".join(f"{k}={v}" for k, v in short.items())
            + "; expected at least one full batch (the last partial batch is dropped): lower the batch size(s) or "
            "add data"
        )
    return n
