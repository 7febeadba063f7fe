"""nn.Module wrappers over segops.ops."""
from .conv import AtrousConv2d
from .overlap import DiceLoss, JaccardLoss
from .roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = ["AtrousConv2d", "DiceLoss", "JaccardLoss", "MultiScaleRoIAlign", "RoIAlign"]
