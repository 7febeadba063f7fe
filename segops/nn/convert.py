"""convert_model / revert_model: swap the layers of any nn.Module for their
segops twins (and back), sharing parameters and buffers, so the state_dict
and the outputs are unchanged."""
from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .._checks import ArgumentError, ArgumentTypeError
from ..ops.roi_align import level_range
from ._share import retype
from .conv import AtrousConv2d
from .conv_transpose import ConvTranspose2d
from .roi_align import MultiScaleRoIAlign, RoIAlign

OPS = ("atrous_conv", "conv", "conv_transpose", "roi_align", "detection")

# torchvision.models.detection classes whose segops twins (same attribute
# names) run segops' NMS, box decoding, mask targets and mask pasting
DETECTION_CLASSES = ("AnchorGenerator", "GeneralizedRCNNTransform", "RegionProposalNetwork",
                     "RoIHeads")


def _check_model(function: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"{function}: model must be a torch.nn.Module, "
                                f"got {type(model).__name__}")


def _check_inplace(function: str, inplace) -> None:
    if not isinstance(inplace, bool):
        raise ArgumentTypeError(f"{function}: inplace must be a bool, got {type(inplace).__name__}")


def _check_ops(ops) -> tuple[str, ...]:
    """``ops`` as a tuple of names; one name alone is accepted too."""
    if isinstance(ops, str):
        ops = (ops,)
    try:
        ops = tuple(ops)
    except TypeError:
        raise ArgumentTypeError(f"convert_model: ops must be a sequence of names from {OPS}, "
                                f"got {type(ops).__name__}") from None
    if not all(isinstance(op, str) for op in ops):
        raise ArgumentTypeError(f"convert_model: ops must be names from {OPS}, got {ops!r}")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ArgumentError(f"convert_model: unknown ops {unknown}; choose from {OPS}")
    return ops


@dataclasses.dataclass
class ConversionReport:
    """What convert_model/revert_model replaced: (module name, old class,
    new class) per layer, and the model (a copy when inplace=False).
    ``left``: (module name, class) of the subclasses of a layer the call
    would replace, left as they are (a subclass may change the forward; a
    parametrized conv, weight_norm's, is one)."""
    model: nn.Module
    replaced: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"{len(self.replaced)} layers replaced:" if self.replaced
                 else "nothing replaced"]
        lines += [f"  {name or '(the model itself)'}: {old} -> {new}"
                  for name, old, new in self.replaced]
        if self.left:
            lines.append(f"{len(self.left)} subclasses left as they are:")
            lines += [f"  {name or '(the model itself)'}: {cls}" for name, cls in self.left]
        return "\n".join(lines)


def _torchvision_ops():
    try:
        import torchvision.ops
    except ImportError:
        return None
    return torchvision.ops


def _torchvision_detection() -> dict | None:
    """torchvision's detection classes by name, plus its BoxCoder and box_iou."""
    try:
        from torchvision.models.detection import _utils, anchor_utils, roi_heads, rpn, transform
        from torchvision.ops import box_iou
    except ImportError:
        return None
    return {"AnchorGenerator": anchor_utils.AnchorGenerator,
            "GeneralizedRCNNTransform": transform.GeneralizedRCNNTransform,
            "RegionProposalNetwork": rpn.RegionProposalNetwork, "RoIHeads": roi_heads.RoIHeads,
            "BoxCoder": _utils.BoxCoder, "box_iou": box_iou}


def _segops_detection() -> dict:
    from ..models.detection import _utils, anchors, roi_heads, rpn, transform
    from ..ops import box_iou
    return {"AnchorGenerator": anchors.AnchorGenerator,
            "GeneralizedRCNNTransform": transform.GeneralizedRCNNTransform,
            "RegionProposalNetwork": rpn.RegionProposalNetwork, "RoIHeads": roi_heads.RoIHeads,
            "BoxCoder": _utils.BoxCoder, "box_iou": box_iou}


def _detection_twin(module: nn.Module, to_segops: bool) -> nn.Module | None:
    """The twin of a torchvision detection part (or back): the same state
    (``__dict__`` shared shallowly: heads, pools, matchers and samplers are
    the same objects), with the box coder and IoU function of the other
    library."""
    tv = _torchvision_detection()
    if tv is None:
        return None
    source, target = (tv, _segops_detection()) if to_segops else (_segops_detection(), tv)
    for name in DETECTION_CLASSES:
        if type(module) is source[name]:
            if name == "RoIHeads" and getattr(module, "keypoint_predictor", None) is not None:
                return None  # Keypoint R-CNN: segops' RoIHeads has no keypoint branch
            twin = retype(module, target[name])
            if type(getattr(twin, "box_coder", None)) is source["BoxCoder"]:
                twin.box_coder = target["BoxCoder"](twin.box_coder.weights,
                                                    twin.box_coder.bbox_xform_clip)
            if getattr(twin, "box_similarity", None) is source["box_iou"]:
                twin.box_similarity = target["box_iou"]
            if name == "AnchorGenerator":   # segops' anchor cache, not torchvision's
                if to_segops:
                    twin.__dict__.setdefault("_cache", {})
                else:
                    twin.__dict__.pop("_cache", None)
            if name == "RoIHeads":  # torchvision's also has (empty) keypoint parts
                for part in ("keypoint_roi_pool", "keypoint_head", "keypoint_predictor"):
                    twin.__dict__.setdefault(part, None)
            return twin
    return None


def _segops_twin(module: nn.Module, ops) -> nn.Module | None:
    if "detection" in ops:
        twin = _detection_twin(module, to_segops=True)
        if twin is not None:
            return twin
    if type(module) is nn.Conv2d:
        dilated = max(module.dilation) > 1
        if "conv" in ops or (dilated and "atrous_conv" in ops):
            return AtrousConv2d.from_conv(module)
    if type(module) is nn.ConvTranspose2d and "conv_transpose" in ops:
        return ConvTranspose2d.from_conv_transpose(module)
    tv = _torchvision_ops()
    if tv is not None and "roi_align" in ops:
        if type(module) is tv.RoIAlign:
            return _keep_module_state(module, RoIAlign(module.output_size, module.spatial_scale,
                                                       module.sampling_ratio, module.aligned))
        if type(module) is tv.MultiScaleRoIAlign:
            twin = MultiScaleRoIAlign(module.featmap_names, module.output_size,
                                      module.sampling_ratio,
                                      canonical_scale=module.canonical_scale,
                                      canonical_level=module.canonical_level)
            mapper = getattr(module, "map_levels", None)
            if mapper is not None:   # else torchvision infers both at its next call
                twin.scales, twin.level_rule = module.scales, (mapper.s0, mapper.lvl0)
            return _keep_module_state(module, twin)
    return None


def _subclass_of(module: nn.Module, kinds) -> bool:
    """An instance of one of ``kinds`` whose class is none of them."""
    return type(module) not in kinds and any(isinstance(module, k) for k in kinds)


def _torch_layer_kinds(ops) -> list[type]:
    """The torch / torchvision classes ``ops`` replace, nn.Conv2d aside (that
    one depends on each layer's dilation: ``_left_subclass``)."""
    kinds = [nn.ConvTranspose2d] if "conv_transpose" in ops else []
    tv = _torchvision_ops()
    if tv is not None and "roi_align" in ops:
        kinds += [tv.RoIAlign, tv.MultiScaleRoIAlign]
    detection = _torchvision_detection()
    if detection is not None and "detection" in ops:
        kinds += [detection[name] for name in DETECTION_CLASSES]
    return kinds


def _left_subclass(module: nn.Module, ops, kinds: list[type]) -> bool:
    """A subclass (not segops' own) of a layer that ``ops`` replace; ``kinds``
    from ``_torch_layer_kinds(ops)``."""
    if type(module) in (AtrousConv2d, ConvTranspose2d, RoIAlign, MultiScaleRoIAlign):
        return False
    if isinstance(module, nn.Conv2d) and ("conv" in ops or (
            "atrous_conv" in ops and max(module.dilation) > 1)):
        kinds = kinds + [nn.Conv2d]
    return _subclass_of(module, kinds)


def _segops_layer_kinds() -> list[type]:
    """The segops classes revert_model replaces (their subclasses, e.g. a
    parametrized AtrousConv2d, weight_norm's, are left)."""
    kinds = [AtrousConv2d, ConvTranspose2d, RoIAlign, MultiScaleRoIAlign]
    if _torchvision_detection() is not None:
        detection = _segops_detection()
        kinds += [detection[name] for name in DETECTION_CLASSES]
    return kinds


def _torch_twin(module: nn.Module) -> nn.Module | None:
    twin = _detection_twin(module, to_segops=False)
    if twin is not None:
        return twin
    if type(module) is AtrousConv2d:
        if module.activation is not None:
            raise ArgumentError("revert_model: model holds an AtrousConv2d with a fused "
                                "activation, which has no nn.Conv2d twin")
        twin = retype(module, nn.Conv2d)
        del twin.activation
        return twin
    if type(module) is ConvTranspose2d:
        return retype(module, nn.ConvTranspose2d)
    tv = _torchvision_ops()
    if tv is None or type(module) not in (RoIAlign, MultiScaleRoIAlign):
        return None
    if module.pool_mode != "avg" or (module.aligned and type(module) is MultiScaleRoIAlign):
        raise ArgumentError(f"revert_model: model holds {type(module).__name__}"
                            f"({module.extra_repr()}), which has no torchvision twin")
    if type(module) is RoIAlign:
        twin = tv.RoIAlign(module.output_size, module.spatial_scale, module.sampling_ratio,
                           module.aligned)
    else:
        twin = tv.MultiScaleRoIAlign(module.featmap_names, module.output_size,
                                     module.sampling_ratio,
                                     canonical_scale=module.canonical_scale,
                                     canonical_level=module.canonical_level)
        _keep_scales(module, twin)
    return _keep_module_state(module, twin)


def _keep_scales(module: MultiScaleRoIAlign, twin: nn.Module) -> None:
    """The scales a segops MultiScaleRoIAlign has kept, and its level rule,
    set on its torchvision twin (whose LevelMapper takes them)."""
    if module.scales is None:
        return
    from torchvision.ops.poolers import initLevelMapper
    rule = module.level_rule or (module.canonical_scale, module.canonical_level)
    twin.scales = list(module.scales)
    twin.map_levels = initLevelMapper(*level_range(module.scales), *rule)


def _swap(model: nn.Module, twin_of, prefix: str = "",
          seen: dict | None = None) -> list[tuple[str, str, str]]:
    """Replace each child that has a twin, then recurse into the live child
    (a twin's children are swapped in the twin, not in the replaced module).
    A module reached at several places (``nn.Sequential(c, relu, c)``) gets
    one twin, set at each place, as torch sees one module there: one set of
    hooks, one training flag, tied parameters that stay tied."""
    seen = {} if seen is None else seen
    replaced = []
    # _modules, not named_children(), which lists a module only at its first place
    for child_name, child in list(model._modules.items()):
        if child is None:
            continue
        name = f"{prefix}{child_name}"
        if id(child) in seen:
            twin = seen[id(child)][1]
            if twin is not child:
                setattr(model, child_name, twin)
                replaced.append((name, type(child).__name__, type(twin).__name__))
            continue
        twin = twin_of(child)
        # the original is kept alive with its twin, so its id is not reused
        seen[id(child)] = (child, child if twin is None else twin)
        if twin is not None:
            seen[id(twin)] = (twin, twin)
            setattr(model, child_name, twin)
            replaced.append((name, type(child).__name__, type(twin).__name__))
            child = twin
        replaced += _swap(child, twin_of, name + ".", seen)
    return replaced


def _refuse_compiled(model: nn.Module, twin_of, function: str) -> None:
    """Refuse, before any swap, a layer compiled with ``Module.compile()``:
    its twin would keep the compiled forward of the original class (and the
    compile options cannot be recovered to compile the twin)."""
    for module in model.modules():
        if (module.__dict__.get("_compiled_call_impl") is not None
                and twin_of(module) is not None):
            raise ArgumentError(f"{function}: a {type(module).__name__} was compiled with "
                                "Module.compile(); convert the model before compiling it")


def _convert(model: nn.Module, twin_of) -> ConversionReport:
    """The model with its layers swapped; the model itself too when it is
    one of the layers (its twin is the report's ``model``, named "")."""
    seen = {}
    replaced = []
    twin = twin_of(model)
    if twin is not None:
        seen[id(model)], seen[id(twin)] = (model, twin), (twin, twin)
        replaced.append(("", type(model).__name__, type(twin).__name__))
        model = twin
    return ConversionReport(model, replaced + _swap(model, twin_of, "", seen))


def _keep_module_state(module: nn.Module, twin: nn.Module) -> nn.Module:
    """``twin`` (a new module) with ``module``'s training flag and hooks (the
    same dicts, as ``retype`` shares them, and ``_is_full_backward_hook``,
    without which torch fires no backward hook)."""
    twin.training = module.training
    for key, value in module.__dict__.items():
        if "hook" in key:
            twin.__dict__[key] = value
    return twin


def convert_model(model: nn.Module, *,
                  ops=("atrous_conv", "conv_transpose", "roi_align", "detection"),
                  inplace: bool = True) -> ConversionReport:
    """Replace, in any nn.Module, the layers segops has kernels for:

    * ``'atrous_conv'``: ``nn.Conv2d`` with dilation > 1 -> AtrousConv2d;
    * ``'conv'``: every ``nn.Conv2d`` -> AtrousConv2d;
    * ``'conv_transpose'``: ``nn.ConvTranspose2d`` -> segops ConvTranspose2d;
    * ``'roi_align'``: torchvision's ``RoIAlign`` / ``MultiScaleRoIAlign``;
    * ``'detection'``: torchvision's detection ``AnchorGenerator``,
      ``RegionProposalNetwork``, ``RoIHeads`` and ``GeneralizedRCNNTransform``
      -> segops' (batch-wide NMS, box decoding, mask targets and mask
      pasting on segops' kernels; heads and matchers shared).

    ``ops`` is a sequence of those names (or one name).

    Only those exact classes are replaced (a user subclass may change the
    forward; the report's ``left`` lists the subclasses found), and none
    compiled with ``Module.compile()`` (an ArgumentError: convert first).
    The twins share the original parameters and buffers: the state_dict is
    unchanged and the outputs match. With ``inplace=False`` a
    deep copy is converted. Returns a :class:`ConversionReport`: ``.model``
    is the converted model, a new object when ``model`` is itself one of
    those layers (``convert_model(nn.Conv2d(...)).model``; the original
    object cannot change class in place), else ``model`` (or its copy).
    """
    _check_model("convert_model", model)
    ops = _check_ops(ops)
    _check_inplace("convert_model", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    _refuse_compiled(model, lambda m: _segops_twin(m, ops), "convert_model")
    report = _convert(model, lambda m: _segops_twin(m, ops))
    kinds = _torch_layer_kinds(ops)
    report.left = [(name, type(m).__name__) for name, m in report.model.named_modules()
                   if _left_subclass(m, ops, kinds)]
    return report


def revert_model(model: nn.Module, *, inplace: bool = True) -> ConversionReport:
    """Undo :func:`convert_model`: every segops layer back to its torch /
    torchvision class, parameters shared (the model itself too: take the
    report's ``.model``). Only those exact classes are replaced: the
    report's ``left`` lists the subclasses found (e.g. an AtrousConv2d
    parametrized after conversion). Returns a ConversionReport."""
    _check_model("revert_model", model)
    _check_inplace("revert_model", inplace)
    if not inplace:
        model = copy.deepcopy(model)
    _refuse_compiled(model, _torch_twin, "revert_model")
    report = _convert(model, _torch_twin)
    kinds = _segops_layer_kinds()
    report.left = [(name, type(m).__name__) for name, m in report.model.named_modules()
                   if _subclass_of(m, kinds)]
    return report
