"""The public functional API: every op checks its arguments, then runs the
Triton kernel or the reference (see segops._dispatch)."""
from .boxes import (
    batched_nms,
    batched_nms_per_image,
    box_iou,
    clip_boxes_to_image,
    decode_boxes,
    nms,
)
from .conv import atrous_conv2d
from .conv_transpose import conv_transpose2d
from .masks import mask_targets, paste_masks
from .overlap import (
    confusion_matrix,
    dice_loss,
    dice_score,
    iou_score,
    jaccard_loss,
    overlap_sums,
)
from .roi_align import multi_scale_roi_align, roi_align

__all__ = [
    "atrous_conv2d",
    "batched_nms",
    "batched_nms_per_image",
    "box_iou",
    "clip_boxes_to_image",
    "decode_boxes",
    "nms",
    "confusion_matrix",
    "conv_transpose2d",
    "dice_loss",
    "dice_score",
    "iou_score",
    "jaccard_loss",
    "mask_targets",
    "multi_scale_roi_align",
    "overlap_sums",
    "paste_masks",
    "roi_align",
]

# torch.fx.symbolic_trace keeps a call to segops.ops.<name>(...) as one graph node
# (as torchvision's ops do): wrap registers each name in this module's globals,
# which the tracer patches while it traces. torch.jit.script meets a clear
# error where a scripted forward calls an op (its __prepare_scriptable__).
import functools as _functools  # noqa: E402

from torch import fx as _fx  # noqa: E402

from .._checks import refuse_script as _refuse_script  # noqa: E402

for _name in __all__:
    _fx.wrap(_name)
    globals()[_name].__prepare_scriptable__ = _functools.partial(_refuse_script,
                                                                 f"segops.ops.{_name}")
del _name
