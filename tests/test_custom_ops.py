"""Contracts of the torch.library custom ops (segops::*) that hold across
op families and torch versions."""
import torch

import segops.ops  # noqa: F401  (registers every segops:: op)

# every family's ops, so the listing below cannot come back empty or partial
EXPECTED = {"conv2d", "conv_transpose2d", "roi_align", "roi_align_backward", "roi_levels",
            "overlap_loss", "overlap_sums", "confusion_matrix", "box_iou", "batched_nms",
            "paste_masks", "mask_targets"}


def _segops_ops() -> dict:
    namespace = torch.ops.segops
    ops = {}
    for name in dir(namespace):
        packet = getattr(namespace, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            ops[name] = packet.default
    return ops


def test_no_custom_op_argument_has_a_default():
    """The dispatcher drops an argument equal to its schema default, and
    before torch 2.14 register_autograd's generated backward then expects
    one gradient fewer than the formula returns: every backward of such an
    op fails ("Expected the return from backward to be of the same
    structure as the inputs"). So no segops op may declare a default."""
    ops = _segops_ops()
    assert EXPECTED <= set(ops), sorted(EXPECTED - set(ops))
    defaults = {name: [a.name for a in op._schema.arguments if a.has_default_value()]
                for name, op in ops.items()}
    assert {name: args for name, args in defaults.items() if args} == {}
