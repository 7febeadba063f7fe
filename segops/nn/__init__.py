"""nn.Module wrappers over segops.ops."""
from . import init
from .conv import AtrousConv2d
from .conv_transpose import ConvTranspose2d
from .overlap import DiceLoss, JaccardLoss
from .roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = ["AtrousConv2d", "ConvTranspose2d", "DiceLoss", "JaccardLoss", "MultiScaleRoIAlign",
           "RoIAlign", "init"]
