"""Seeding for exact resume: every stage and every epoch draws its randomness from ``(seed, stream, epoch)``.

:func:`seed_everything` seeds torch, numpy and Python ``random`` from a seed and a stream of integers; the bundle
calls it before each stage is built (stage 1, stage 2, evaluation), so a network's initial weights and the latent
cache do not depend on whether an earlier stage trained in this process or was skipped as finished.
:class:`EpochSeeding` (attached by :class:`ddcore.checkpoints.ResumeFromCheckpoint` with a ``seed``) reseeds at
each epoch start, so a run resumed from an epoch checkpoint repeats the uninterrupted run bit for bit (same
machine, same thread count).
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["EpochSeeding", "seed_everything"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int, *stream: int) -> int:
    """Seed torch, numpy and Python's ``random`` with a seed derived from ``seed`` and a stream of integers.

    The derived seed comes from :class:`numpy.random.SeedSequence`, so ``(0, 1, 5)`` and ``(0, 1, 6)`` give
    unrelated streams.

    Args:
        seed: the run's seed (the config's ``seed``).
        *stream: integers naming the stream (e.g. stage and epoch).

    Returns:
        The derived 32-bit seed.
    """
    derived = int(np.random.SeedSequence([int(seed), *(int(s) for s in stream)]).generate_state(1)[0])
    torch.manual_seed(derived)
    np.random.seed(derived)
    random.seed(derived)
    return derived


class EpochSeeding:
    """Reseed every random number generator at the start of each epoch (and at completion) from the epoch number.

    At ``EPOCH_STARTED`` of epoch ``e`` torch, numpy and Python ``random`` are seeded with
    :func:`seed_everything` ``(seed, stream, e)``, and the random transforms of the data loader's dataset get
    :func:`monai.data.utils.set_rnd` with that seed. ignite creates each epoch's data iterator after
    ``EPOCH_STARTED``, and MONAI's ``DataLoader`` (``num_workers=0``) shuffles with the global torch generator,
    so the epoch's data order, noise and timesteps depend on ``(seed, stream, e)`` only: not on what ran before
    (a resumed run skips the killed epoch's partial work, validation, or the previous stage). At ``COMPLETED`` the
    generators are seeded with ``(seed, stream, 0)``, so what follows training (e.g. the latent scale factor's
    pass over a shuffled loader) is the same whether the run trained or only resumed a finished checkpoint.

    Its :meth:`state_dict` (saved under ``rng`` in each checkpoint) records the seed, the stream and the torch,
    numpy and Python generator states at the save; :meth:`load_state_dict` restores them and warns when the seed
    differs from the configured one (the continuation then uses the configured seed).

    Args:
        seed: the run's seed.
        stream: a number per trainer (stage 1: 1, stage 2: 2), so two stages never share a stream.
    """

    def __init__(self, seed: int, stream: int = 0) -> None:
        self.seed = int(seed)
        self.stream = int(stream)

    def attach(self, engine: Engine) -> None:
        """Register on ``EPOCH_STARTED`` and ``COMPLETED`` of ``engine``.

        Args:
            engine: the trainer.
        """
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine: Engine) -> None:
        """Seed the generators for the epoch that starts.

        Args:
            engine: the trainer (its ``state.epoch`` is the 1-based epoch that starts).
        """
        derived = seed_everything(self.seed, self.stream, int(engine.state.epoch))
        transform = getattr(getattr(getattr(engine, "data_loader", None), "dataset", None), "transform", None)
        if transform is not None:
            from monai.data.utils import set_rnd

            set_rnd(transform, derived)

    def completed(self, engine: Engine) -> None:
        """Seed the generators for what follows training.

        Args:
            engine: the trainer.
        """
        seed_everything(self.seed, self.stream, 0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The seed, the stream and the current generator states, as tensors (``weights_only``-loadable).

        Returns:
            ``{"seed", "stream", "torch", "numpy", "numpy_pos", "python"}``.
        """
        _, keys, pos, *_ = np.random.get_state()
        version, internal, _ = random.getstate()
        return {
            "seed": torch.tensor(self.seed),
            "stream": torch.tensor(self.stream),
            "torch": torch.get_rng_state(),
            "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "numpy_pos": torch.tensor(int(pos)),
            "python": torch.tensor([version, *internal], dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator states of a checkpoint (warns when its seed is not the configured one).

        Args:
            state: a :meth:`state_dict`.
        """
        seed = int(state["seed"])
        if seed != self.seed:
            message = f"resuming a checkpoint written with seed {seed}; the configured seed {self.seed} is used"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            logger.warning(message)
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), int(state["numpy_pos"])))
        python = [int(v) for v in state["python"]]
        random.setstate((python[0], tuple(python[1:]), None))
