"""Stateful metrics: update / compute / reset, synced across ranks."""
from .overlap import DiceScore, MeanIoU

__all__ = ["DiceScore", "MeanIoU"]
