"""RoIAlign modules: drop-ins for torchvision.ops.RoIAlign and
torchvision.ops.MultiScaleRoIAlign (same constructors, same forward)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, refuse_script
from ..ops.roi_align import multi_scale_roi_align, roi_align

# graph leaves for torch.fx.symbolic_trace (as torchvision's ops)
torch.fx.wrap("roi_align")
torch.fx.wrap("multi_scale_roi_align")


class RoIAlign(nn.Module):
    """``torchvision.ops.RoIAlign`` on segops' kernels; see
    :func:`segops.ops.roi_align` for shapes and conventions.

    forward(input ``(N, C, H, W)``, rois ``Tensor[K, 5]`` or list of
    ``Tensor[L, 4]``) -> ``(K, C, *output_size)``.
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, *, pool_mode: str = "avg"):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pool_mode = pool_mode

    def forward(self, input: Tensor, rois) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned, pool_mode=self.pool_mode)

    def extra_repr(self) -> str:
        # torchvision's repr, then the options torchvision does not have
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
                + _extras(pool_mode=self.pool_mode))


_DEFAULTS = {"aligned": False, "pool_mode": "avg"}


def _extras(**options) -> str:
    """", name=value" for each segops-only option that is not its default."""
    return "".join(f", {name}={value!r}" for name, value in options.items()
                   if value != _DEFAULTS[name])


def infer_scale(feature: Tensor, original_size: tuple[int, int]) -> float:
    """torchvision's scale inference: feature size / image size rounded to a
    power of 2 (taken from the height), the log2 taken in torch's default
    dtype as there (float32 unless ``torch.set_default_dtype`` says
    otherwise; some ratios near 2**(k + 1/2) round differently in each)."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(torch.tensor(approx).log2().round())


@torch.fx.wrap
def _filter_features(x: dict[str, Tensor], featmap_names: list[str]) -> list[Tensor]:
    """The maps of ``x`` named in ``featmap_names``, in ``x``'s order (a
    torch.fx leaf: a traced ``x`` is one Proxy)."""
    return [v for k, v in x.items() if k in featmap_names]


# torch.jit.script compiles this first in MultiScaleRoIAlign.forward (and
# could not: comprehension ifs): the clear error of segops' ops instead
_filter_features.__prepare_scriptable__ = functools.partial(refuse_script,
                                                            "segops.nn.MultiScaleRoIAlign")


@torch.fx.wrap
def _setup_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
    """MultiScaleRoIAlign.setup_scales as a torch.fx leaf (it needs sizes)."""
    return MultiScaleRoIAlign.setup_scales(features, image_shapes)


class MultiScaleRoIAlign(nn.Module):
    """``torchvision.ops.MultiScaleRoIAlign`` with every FPN level pooled in
    one kernel launch.

    forward(x: dict of feature maps ``(N, C, H_l, W_l)``, boxes: list of N
    ``Tensor[L_i, 4]`` in image coordinates, image_shapes: list of N
    (height, width)) -> ``(sum L_i, C, *output_size)``.

    The maps named in ``featmap_names`` are used in ``x``'s order. Scales are
    inferred on the first call from the largest image size and kept, with
    the ``canonical_scale`` / ``canonical_level`` of that call
    (``level_rule``), as torchvision keeps its LevelMapper (scales set by
    hand are kept too; the rule is fixed at the next call). Its level rules
    hold: maps need not be one level
    apart, and a box whose level matches no map (past the last one, or NaN
    for a box reversed along one axis) gives zeros. ``aligned=True`` gives Detectron2's ROIAlignV2;
    ``pool_mode='max'`` mmcv's max pooling.
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4,
                 aligned: bool = False, pool_mode: str = "avg"):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.aligned = aligned
        self.pool_mode = pool_mode
        self.scales: list[float] | None = None
        self.level_rule: tuple[float, int] | None = None   # (canonical_scale, canonical_level)

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_features(x, self.featmap_names)
        scales = self.scales
        if scales is None:
            scales = _setup_scales(features, image_shapes)
        rule = self.level_rule or (self.canonical_scale, self.canonical_level)
        # kept once (traced: recomputed by the graph); no module write per call
        if (self.scales is None or self.level_rule is None) \
                and not isinstance(scales, torch.fx.Proxy):
            self.scales, self.level_rule = scales, rule
        return multi_scale_roi_align(
            features, boxes, self.output_size, scales, self.sampling_ratio,
            canonical_scale=rule[0], canonical_level=rule[1],
            aligned=self.aligned, pool_mode=self.pool_mode)

    @staticmethod
    def setup_scales(features: list[Tensor], image_shapes: list[tuple[int, int]]) -> list[float]:
        if not image_shapes:
            raise ArgumentError("image_shapes is empty: pass the (height, width) of each "
                                "image")
        original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
        return [infer_scale(f, original) for f in features]

    def extra_repr(self) -> str:
        # torchvision's repr, then the options torchvision does not have
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}"
                + _extras(aligned=self.aligned, pool_mode=self.pool_mode))
