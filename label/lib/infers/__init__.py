"""The app's infer tasks (both of type ``others``)."""

from lib.infers.damm_synthesis import DAMMSynthesis
from lib.infers.drdm_augment import DRDMAugment

__all__ = ["DAMMSynthesis", "DRDMAugment"]
