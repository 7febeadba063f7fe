"""GeneralizedRCNNTransform: torchvision's detector input transform (resize,
normalise, batch) and its inverse on the detections (boxes back to the
original size, masks pasted with segops' one-launch ``paste_masks``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn._share import refuse_script
from ...ops import paste_masks


class ImageList:
    """A padded batch ``tensors`` ``(N, 3, H, W)`` and each image's size
    before padding (``image_sizes``, list of (h, w))."""

    def __init__(self, tensors: Tensor, image_sizes: list[tuple[int, int]]):
        self.tensors = tensors
        self.image_sizes = image_sizes

    def to(self, device) -> ImageList:
        return ImageList(self.tensors.to(device), self.image_sizes)


def _resize_image_and_masks(image: Tensor, size: float, max_size: float,
                            target: dict[str, Tensor] | None, fixed_size=None):
    """One scale factor so the short side is ``size`` unless the long side
    would pass ``max_size`` (torchvision's rule, in Python floats); bilinear
    for the image, nearest for the masks (kept uint8)."""
    if fixed_size is not None:
        shape, scale_factor, recompute = [fixed_size[1], fixed_size[0]], None, None
    else:
        short, long = min(image.shape[-2:]), max(image.shape[-2:])
        scale_factor = min(size / short, max_size / long)
        shape, recompute = None, True
    image = F.interpolate(image[None], size=shape, scale_factor=scale_factor, mode="bilinear",
                          recompute_scale_factor=recompute, align_corners=False)[0]
    if target is not None and "masks" in target:
        masks = F.interpolate(target["masks"][:, None].float(), size=shape,
                              scale_factor=scale_factor, recompute_scale_factor=recompute)
        target["masks"] = masks[:, 0].byte()
    return image, target


def resize_boxes(boxes: Tensor, original_size, new_size) -> Tensor:
    """Scale ``(N, 4)`` boxes from ``original_size`` to ``new_size`` (h, w);
    the ratios are float32 whatever the boxes' dtype, as torchvision's."""
    ratio_h, ratio_w = (
        torch.tensor(s, dtype=torch.float32, device=boxes.device)
        / torch.tensor(s_orig, dtype=torch.float32, device=boxes.device)
        for s, s_orig in zip(new_size, original_size))
    x1, y1, x2, y2 = boxes.unbind(1)
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def resize_keypoints(keypoints: Tensor, original_size, new_size) -> Tensor:
    """Scale ``(N, K, 3)`` keypoints' x, y from ``original_size`` to
    ``new_size`` (h, w), as torchvision's (for a converted Keypoint R-CNN)."""
    ratio_h, ratio_w = (
        torch.tensor(s, dtype=torch.float32, device=keypoints.device)
        / torch.tensor(s_orig, dtype=torch.float32, device=keypoints.device)
        for s, s_orig in zip(new_size, original_size))
    resized = keypoints.clone()
    resized[..., 0] *= ratio_w
    resized[..., 1] *= ratio_h
    return resized


class GeneralizedRCNNTransform(nn.Module):
    """Resize each image (and its target) so its short side is ``min_size``
    (a random choice of ``min_size`` in training) and its long side at most
    ``max_size``, normalise with ``image_mean``/``image_std``, and pad the
    batch to a multiple of ``size_divisible``.

    forward(images: list of ``(3, H_i, W_i)``, targets) -> (ImageList,
    targets with resized boxes and masks). postprocess maps detections back.
    """

    __prepare_scriptable__ = refuse_script   # a clear error from torch.jit.script

    def __init__(self, min_size, max_size: int, image_mean: list[float],
                 image_std: list[float], size_divisible: int = 32,
                 fixed_size: tuple[int, int] | None = None, **kwargs):
        super().__init__()
        if not isinstance(min_size, (list, tuple)):
            min_size = (min_size,)
        self.min_size = min_size
        self.max_size = max_size
        self.image_mean = image_mean
        self.image_std = image_std
        self.size_divisible = size_divisible
        self.fixed_size = fixed_size
        self._skip_resize = kwargs.pop("_skip_resize", False)
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        images = list(images)
        if targets is not None:  # never modify the caller's dicts
            targets = [{k: v for k, v in t.items()} for t in targets]
        for i, image in enumerate(images):
            if image.dim() != 3:
                raise ValueError("images is expected to be a list of 3d tensors of shape "
                                 f"[C, H, W], got {tuple(image.shape)}")
            target = targets[i] if targets is not None else None
            image, target = self.resize(self.normalize(image), target)
            images[i] = image
            if targets is not None:
                targets[i] = target
        image_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return ImageList(self.batch_images(images, self.size_divisible), image_sizes), targets

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError("Expected input images to be of floating type (in range [0, 1]), "
                            f"but found type {image.dtype} instead")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def torch_choice(self, k: list[int]) -> int:
        """A random element of ``k`` from torch's generator (as torchvision,
        so both draw the same numbers)."""
        return k[int(torch.empty(1).uniform_(0.0, float(len(k))).item())]

    def resize(self, image: Tensor, target: dict[str, Tensor] | None):
        h, w = image.shape[-2:]
        if self.training and self._skip_resize:
            return image, target
        size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        image, target = _resize_image_and_masks(image, size, self.max_size, target,
                                                 self.fixed_size)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "keypoints" in target:
                target["keypoints"] = resize_keypoints(target["keypoints"], (h, w),
                                                       image.shape[-2:])
        return image, target

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        """Zero-pad every image to the batch's largest size, rounded up to a
        multiple of ``size_divisible``."""
        height = max(int(img.shape[-2]) for img in images)
        width = max(int(img.shape[-1]) for img in images)
        height = int(math.ceil(height / float(size_divisible)) * size_divisible)
        width = int(math.ceil(width / float(size_divisible)) * size_divisible)
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for image, slot in zip(images, batch):
            slot[:, :image.shape[1], :image.shape[2]].copy_(image)
        return batch

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Boxes back to each original image size, masks ``(K, 1, MH, MW)``
        pasted into it (float probabilities ``(K, 1, H, W)``)."""
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], original)
            if "keypoints" in pred:
                pred["keypoints"] = resize_keypoints(pred["keypoints"], size, original)
        return result

    def extra_repr(self) -> str:
        return (f"Normalize(mean={self.image_mean}, std={self.image_std})\n"
                f"Resize(min_size={self.min_size}, max_size={self.max_size}, mode='bilinear')")
