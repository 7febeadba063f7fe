"""Stateful metrics: update / compute / reset, synced across ranks."""
from .detection import MeanAveragePrecision, mean_average_precision
from .overlap import DiceScore, MeanIoU

__all__ = ["DiceScore", "MeanAveragePrecision", "MeanIoU", "mean_average_precision"]
