"""nn.Module wrappers over segops.ops."""
from .overlap import DiceLoss, JaccardLoss
from .roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = ["DiceLoss", "JaccardLoss", "MultiScaleRoIAlign", "RoIAlign"]
