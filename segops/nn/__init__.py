"""nn.Module wrappers over segops.ops."""
from . import init
from .conv import AtrousConv2d
from .conv_transpose import ConvTranspose2d
from .convert import ConversionReport, convert_model, revert_model
from .overlap import DiceLoss, JaccardLoss
from .roi_align import MultiScaleRoIAlign, RoIAlign

__all__ = ["AtrousConv2d", "ConversionReport", "ConvTranspose2d", "DiceLoss", "JaccardLoss",
           "MultiScaleRoIAlign", "RoIAlign", "convert_model", "init", "revert_model"]
