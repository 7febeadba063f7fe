"""nn.Module wrappers over segops.ops."""
from .overlap import DiceLoss, JaccardLoss

__all__ = ["DiceLoss", "JaccardLoss"]
