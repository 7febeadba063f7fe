"""Codegen report: what the compiler builds for sm_90, without a GPU.

Without a device the only view of a kernel's performance is the machine code
the compiler makes of it. This module runs the public ops at the benchmark
shapes of DESIGN.md (the cases of benchmarks/conv.py, conv_transpose.py,
roi_align.py, overlap.py, boxes.py and masks.py) on CPU tensors of the real sizes
(``torch.empty``: nothing is touched), in bf16, fp16 and fp32 (TF32 where
the GEMMs use it), NCHW and channels_last, forward and backward, with the
ops switched onto their GPU path. Every kernel launch is intercepted
instead of run (``JITFunction.run``), so what is recorded is the launcher's
real call: arguments, constexprs, grid, num_warps, num_stages. Launches that
go through ``triton.autotune`` are expanded into every config of the tuner
(``Autotuner.run``; configs its ``prune_configs_by`` drops are kept, marked
``pruned``); the fixed config is what the launcher picks with autotuning off.

Each launch is then specialised exactly as the JIT does (Triton's own binder
and ``_pack_args``: ints equal to 1 become constexpr, ints divisible by 16
and 16-byte-aligned pointers get ``tt.divisibility=16``), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and its
cubin read with ``cuobjdump --dump-resource-usage`` and ``cuobjdump -sass``
(both ship with Triton). Per variant: registers, spill stores/loads (STL/LDL),
stack, shared memory, tensor-core instructions (HGMMA/HMMA), async copies
(LDGSTS, TMA), global load/store/atomic widths, MUFU, CTAs per SM on an H100,
and the instructions of the largest loop body (a GEMM's K-step, per warp).

Three things differ from a run on a GPU, on purpose: the launchers see a CPU
device, so (1) the interpreter's bf16 detour (the ``UPCAST`` constexpr) is
switched off, (2) ``target_programs`` answers for an H100 (132 SMs), and
(3) the conv launcher takes its autotune path. The overlap ops' label checks
take their CUDA path (inside the kernels) as on a GPU. Everything else is
the launcher's own code.

Besides the benchmark cases (``suite == "bench"``: the fast paths the gate in
tests/test_codegen.py checks), a ``coverage`` suite compiles, at small
shapes, the variants no benchmark reaches: float64, fp32 without TF32,
bias/ReLU epilogues, RoIAlign's aligned/max/multi-level modes, every
activation and target kind of the overlap sums, the confusion matrix on
labels and on more than 45 classes.

Compiled variants are cached on disk per Triton version, target and kernel
source (``~/.cache/segops-codegen``, or ``SEGOPS_CODEGEN_CACHE``).

Run: ``python -m segops.benchmarks.codegen [--json PATH] [--arch 90]`` or
``segops bench --codegen``. ``--ci`` is the reduced set the gate compiles.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# --------------------------------------------------------------------------
# the machine: an H100 SXM (sm_90)
# --------------------------------------------------------------------------
SMS = 132
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256           # registers are allocated per warp in units of 256
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA = 227 * 1024      # the most one CTA may ask for (dynamic + static)
SMEM_RESERVED_PER_CTA = 1024   # the driver keeps 1 KB per resident CTA

KEYS = ("kernel", "shape", "layout", "dtype", "config", "regs", "spills", "stack", "smem",
        "tensor_core", "async_copies", "ld128", "ld16", "st128", "st16", "mufu", "ctas_per_sm")

# kernel function -> family
FAMILIES = {
    "_conv2d_fwd_kernel": "conv fwd",
    "_conv2d_bwd_input_kernel": "conv grad_input",
    "_conv2d_bwd_weight_kernel": "conv grad_weight",
    "_split_sum_kernel": "conv split-K sum",
    "_nonfinite_extents_kernel": "conv non-finite extents",
    "_poison_taps_kernel": "conv poison taps",
    "_depthwise_fwd_kernel": "depthwise fwd",
    "_depthwise_bwd_input_kernel": "depthwise grad_input",
    "_depthwise_bwd_weight_kernel": "depthwise grad_weight",
    "_conv_transpose_k_eq_s_kernel": "conv_transpose k==s",
    "_roi_align_fwd_kernel": "roi_align fwd",
    "_roi_align_bwd_atomic_kernel": "roi_align bwd atomic",
    "_roi_align_bwd_deterministic_kernel": "roi_align bwd deterministic",
    "_roi_levels_kernel": "roi_levels",
    "_overlap_sums_fwd_kernel": "overlap fwd",
    "_overlap_sums_bwd_kernel": "overlap bwd",
    "_overlap_loss_kernel": "overlap loss",
    "_overlap_loss_bwd_kernel": "overlap loss bwd",
    "_confusion_matrix_kernel": "confusion matrix",
    "_confusion_score_kernel": "confusion score",
    "_box_iou_kernel": "box_iou",
    "_decode_kernel": "decode_boxes",
    "_clip_kernel": "clip_boxes",
    "_nms_mask_kernel": "nms iou mask",
    "_nms_scan_kernel": "nms scan",
    "_paste_masks_kernel": "paste_masks",
    "_mask_targets_kernel": "mask_targets",
}
# families whose kernels are GEMMs (tl.dot): they must run on tensor cores
GEMM_FAMILIES = ("conv fwd", "conv grad_input", "conv grad_weight", "conv_transpose k==s")
# memory-bound families, and the layout their accesses are contiguous in
MEMORY_BOUND_FAST_LAYOUT = {
    "roi_align fwd": "channels_last",
    "roi_align bwd atomic": "channels_last",
    "roi_align bwd deterministic": "channels_last",
    "overlap fwd": "nchw",
    "overlap bwd": "nchw",
    "confusion matrix": "nchw",
    "paste_masks": "nchw",
    "conv split-K sum": "channels_last",
}
# memory-bound families whose traffic is the output they write: their loads
# are gathers (paste_masks: taps of a 28x28 mask, cached), only stores count
STORE_BOUND = ("paste_masks",)


def default_cache_dir() -> Path:
    root = os.environ.get("SEGOPS_CODEGEN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "segops-codegen"


# --------------------------------------------------------------------------
# cases: the benchmark shapes (and the coverage variants)
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    suite: str        # "bench" (the fast paths) or "coverage" (compile-only variants)
    op: str           # benchmark family: conv, conv_transpose, roi_align, overlap
    shape: str
    layout: str       # "nchw" or "channels_last" ("rows" for (N, 4) boxes)
    dtype: str        # the input dtype: bf16, fp16, fp32, fp64
    run: object       # run(phase): calls the op; phase("fwd"/"bwd") tags its launches


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def _torch_dtype(name):
    import torch
    return getattr(torch, _DTYPES[name])


def _empty(shape, dtype, channels_last, requires_grad=False):
    import torch
    fmt = torch.contiguous_format
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    t = torch.empty(shape, dtype=_torch_dtype(dtype), memory_format=fmt)
    return t.requires_grad_(requires_grad)


def _backward(out, phase):
    import torch
    with phase("bwd"):
        out.backward(torch.empty_like(out))


def _conv_cases():
    import segops
    from . import conv as bench
    for (name, N, C_in, size, C_out, k, d, groups), dtype, cl in _product(
            bench.SHAPES, ("bf16", "fp16", "fp32"), (True, False)):
        def run(phase, N=N, C_in=C_in, size=size, C_out=C_out, k=k, d=d, groups=groups,
                dtype=dtype, cl=cl):
            x = _empty((N, C_in, size, size), dtype, cl, True)
            w = _empty((C_out, C_in // groups, k, k), dtype, cl, True)
            with phase("fwd"):
                y = segops.ops.atrous_conv2d(x, w, None, 1, d, d, groups)
            _backward(y, phase)
        yield Case("bench", "conv", f"{name} {N}x{C_in}x{size}^2->{C_out}", _layout(cl), dtype,
                   run)


def _conv_transpose_cases():
    import segops
    from . import conv_transpose as bench
    for (name, N, C_in, size, C_out, k, s, p, op), dtype, cl in _product(
            bench.SHAPES, ("bf16", "fp16", "fp32"), (True, False)):
        def run(phase, N=N, C_in=C_in, size=size, C_out=C_out, k=k, s=s, p=p, op=op,
                dtype=dtype, cl=cl):
            x = _empty((N, C_in, size, size), dtype, cl, True)
            w = _empty((C_in, C_out, k, k), dtype, cl, True)
            with phase("fwd"):
                y = segops.ops.conv_transpose2d(x, w, None, s, p, op)
            _backward(y, phase)
        yield Case("bench", "conv_transpose", f"{name} {N}x{C_in}x{size}^2 k{k}s{s}",
                   _layout(cl), dtype, run)


def _boxes(num_rois, images, image_hw):
    import torch
    g = torch.Generator().manual_seed(num_rois)
    out = []
    for i in range(images):
        count = num_rois // images + (i < num_rois % images)
        sides = torch.exp(torch.empty(count, 2).uniform_(2.77, 6.24, generator=g))
        corner = torch.rand(count, 2, generator=g) * torch.tensor(image_hw[::-1])
        out.append(torch.cat([corner, corner + sides], 1))
    return out


def _roi_align_cases():
    import segops
    from . import roi_align as bench
    for (head, num_rois, size), dtype, cl, multi in _product(
            bench.HEADS, ("bf16", "fp16", "fp32"), (True, False), (False, True)):
        def run(phase, num_rois=num_rois, size=size, dtype=dtype, cl=cl, multi=multi):
            feats = {f"p{i}": _empty((bench.IMAGES, bench.CHANNELS, h, w), dtype, cl, True)
                     for i, (h, w) in enumerate(bench.LEVELS)}
            boxes = _boxes(num_rois, bench.IMAGES, bench.IMAGE)
            if multi:
                module = segops.nn.MultiScaleRoIAlign(list(feats), size, bench.SAMPLING_RATIO)
                def call():
                    return module(feats, boxes, [bench.IMAGE] * bench.IMAGES)
            else:
                def call():
                    return segops.ops.roi_align(feats["p1"], boxes, size, 1 / 8,
                                                bench.SAMPLING_RATIO, validate_args=False)
            _roi_align_phases(call, phase)
        op = "multi_scale" if multi else "roi_align"
        yield Case("bench", "roi_align",
                   f"{op} {head} {num_rois}x{bench.CHANNELS}x{size}^2", _layout(cl), dtype, run)


def _roi_align_phases(call, phase):
    """Forward, atomic backward, then the deterministic backward of ``call``."""
    import torch
    from segops._dispatch import deterministic_algorithms
    with phase("fwd"):
        out = call()
    _backward(out, phase)
    with deterministic_algorithms():
        with phase("fwd", record=False):
            out = call()
        with phase("bwd det"):
            out.backward(torch.empty_like(out))


def _overlap_cases():
    import torch
    from segops import ops
    from . import overlap as bench
    for (N, C, spatial), dtype, cl in _product(bench.SHAPES, ("bf16", "fp16", "fp32"),
                                                (False, True)):
        def run(phase, N=N, C=C, spatial=spatial, dtype=dtype, cl=cl):
            x = _empty((N, C, *spatial), dtype, cl, True)
            t = torch.zeros((N, *spatial), dtype=torch.int64)
            with phase("fwd"):   # validate_args on: the label check in the kernels
                loss = ops.dice_loss(x, t, "multiclass")
            with phase("bwd"):
                loss.backward()
            with phase("fwd"):
                ops.iou_score(ops.confusion_matrix(x.detach(), t, C))   # MeanIoU's calls
        yield Case("bench", "overlap", f"{N}x{C}x{'x'.join(map(str, spatial))}", _layout(cl),
                   dtype, run)


def _boxes_cases():
    """The box ops as Mask R-CNN runs them (benchmarks/boxes.py), float32
    boxes: batched NMS per image (RPN levels, box-head classes), decoding
    with and without the fused clip, the clip of (N, classes, 4) boxes, and
    the IoU matrix of 20 GT boxes against an 800x1216 image's anchors."""
    import torch
    from segops import ops
    from . import boxes as bench

    def nms_run(images, levels, per_level, threshold, cap):
        def run(phase):
            n = images * levels * per_level
            idxs = torch.arange(levels).repeat_interleave(per_level).repeat(images)
            image_ids = torch.arange(images).repeat_interleave(levels * per_level)
            with phase("fwd"):
                ops.batched_nms_per_image(bench._boxes(n, torch.Generator().manual_seed(0)),
                                          torch.rand(n), idxs, image_ids, threshold, cap,
                                          num_images=images)
        return run
    images = bench.RPN_IMAGES[0]
    yield Case("bench", "boxes", f"nms rpn {images}x{bench.RPN_LEVELS}x{bench.RPN_PER_LEVEL}",
               "rows", "fp32", nms_run(images, bench.RPN_LEVELS, bench.RPN_PER_LEVEL, 0.7,
                                       1000))
    proposals, classes = bench.BOX_HEAD
    yield Case("bench", "boxes", f"nms box head {classes}x40", "rows", "fp32",
               nms_run(1, classes, 40, 0.5, 100))  # ~3 600 boxes pass the 0.05 score

    def decode_run(phase):
        codes = _empty((bench.DECODE_ROWS, 4 * (classes + 1)), "fp32", False)
        boxes = _empty((bench.DECODE_ROWS, 4), "fp32", False)
        with phase("fwd"):
            ops.decode_boxes(codes, boxes, (10.0, 10.0, 5.0, 5.0))
            decoded = ops.decode_boxes(codes, boxes, (10.0, 10.0, 5.0, 5.0),
                                       image_size=bench.IMAGE)
            ops.clip_boxes_to_image(decoded.view(bench.DECODE_ROWS, classes + 1, 4),
                                    bench.IMAGE)
    yield Case("bench", "boxes", f"decode, clip {bench.DECODE_ROWS}x{classes + 1}", "rows",
               "fp32", decode_run)

    def iou_run(phase):
        with phase("fwd"):
            ops.box_iou(_empty((20, 4), "fp32", False), _empty((242991, 4), "fp32", False))
    yield Case("bench", "boxes", "box_iou 20x242991 anchors", "rows", "fp32", iou_run)


def _masks_cases():
    """benchmarks/masks.py: 100 masks of 28^2 pasted into 800x1216 (float and
    thresholded), and the mask targets of 512 RoIs against 20 uint8 GT masks
    at 800x1216, M = 28."""
    import torch
    from segops import ops
    from . import masks as bench
    height, width = bench.IMAGE

    def paste_run(phase, threshold):
        masks = _empty((bench.PASTE_MASKS, 1, bench.MASK_SIZE, bench.MASK_SIZE), "fp32", False)
        boxes = _empty((bench.PASTE_MASKS, 4), "fp32", False)
        with phase("fwd"):
            ops.paste_masks(masks, boxes, bench.IMAGE, threshold=threshold)
    for kind, threshold in (("float", None), ("bool", bench.THRESHOLD)):
        yield Case("bench", "masks", f"paste {kind} {bench.PASTE_MASKS}x{bench.MASK_SIZE}^2 -> "
                   f"{height}x{width}", "nchw", "fp32",
                   functools.partial(paste_run, threshold=threshold))

    def targets_run(phase):
        gt = torch.empty((bench.GT_MASKS, height, width), dtype=torch.uint8)
        rois = _empty((bench.TARGET_ROIS, 4), "fp32", False)
        idx = torch.zeros(bench.TARGET_ROIS, dtype=torch.int64)
        with phase("fwd"):
            ops.mask_targets(gt, rois, idx, bench.M, validate_args=False)
    yield Case("bench", "masks", f"mask_targets {bench.TARGET_ROIS} rois, {bench.GT_MASKS}x"
               f"{height}x{width} u8", "nchw", "fp32", targets_run)


def _coverage_cases():
    """What tests/compile_sm90.py compiled and no benchmark launches: float64,
    fp32 without TF32, bias/ReLU epilogues, every RoIAlign mode (aligned, max,
    several levels), every activation and target kind of the overlap sums, the
    confusion matrix on labels and past 45 classes. Small shapes, the fixed
    config, through the public ops (forward and backward)."""
    import torch
    from segops import ops

    def case(op, shape, layout, dtype, fn):
        return Case("coverage", op, shape, layout, dtype, fn)

    # (dtype, TF32, with and without bias/ReLU): bf16/fp16/TF32 without flags are
    # benchmark variants
    for dtype, tf32, both in (("fp64", False, True), ("fp32", False, True),
                              ("bf16", False, False), ("fp16", False, True),
                              ("fp32", True, False)):
        def run(phase, dtype=dtype, tf32=tf32, both=both):
            previous = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = tf32
            try:
                for flags in (False, True) if both else (True,):
                    x = _empty((2, 32, 9, 9), dtype, False, True)
                    w = _empty((48, 32, 3, 3), dtype, False, True)
                    b = _empty((48,), dtype, False, True) if flags else None
                    with phase("fwd"):
                        y = ops.atrous_conv2d(x, w, b, 1, 1, 1, 1,
                                              activation="relu" if flags else None)
                    _backward(y, phase)
                    wt = _empty((32, 24, 2, 2), dtype, False, True)
                    bt = _empty((24,), dtype, False, True) if flags else None
                    with phase("fwd"):
                        y = ops.conv_transpose2d(x, wt, bt, 2)
                    _backward(y, phase)
                    # the stride-residue gather with a bias: conv_transpose2d's general case
                    with phase("fwd"):
                        ops.conv_transpose2d(x, _empty((32, 24, 3, 3), dtype, False), bt, 2, 1, 1)
            finally:
                torch.backends.cudnn.allow_tf32 = previous
        yield case("conv", "coverage 2x32x9^2->48 k3" + (" (+bias, relu)" if both
                                                        else " bias, relu"), "nchw",
                   "tf32" if tf32 else dtype, run)
    for dtype, flags in (("bf16", True), ("fp16", False), ("fp32", True), ("fp64", False)):
        def run(phase, dtype=dtype, flags=flags):
            x = _empty((2, 24, 9, 9), dtype, False, True)
            w = _empty((24, 1, 3, 3), dtype, False, True)
            b = _empty((24,), dtype, False, True) if flags else None
            with phase("fwd"):
                y = ops.atrous_conv2d(x, w, b, 1, 2, 2, 24, activation="relu" if flags else None)
            _backward(y, phase)
            if flags:  # the depthwise gather with a bias: a depthwise transposed convolution
                with phase("fwd"):
                    ops.conv_transpose2d(x, _empty((24, 1, 3, 3), dtype, False), b, 2, 1, 1,
                                         groups=24)
        yield case("conv", "coverage depthwise 2x24x9^2 k3 d2" + (" (+bias, relu)" if flags
                                                                 else ""), "nchw", dtype, run)
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        def run(phase, dtype=dtype):
            for cl, levels, aligned, pool, ratio in _product(
                    (False, True), (False, True), (False, True), ("avg", "max"), (2, -1)):
                if dtype != "bf16" and (aligned or levels or not cl or ratio < 0):
                    continue  # the dtype only changes loads, stores and ACC
                if ratio < 0 and (aligned or levels):
                    continue  # adaptive sampling (the ADAPTIVE branch): one RoI geometry
                feats = [_empty((2, 24, 12, 16), dtype, cl, True),
                         _empty((2, 24, 6, 8), dtype, cl, True)]
                boxes = [torch.tensor([[1.0, 1.0, 9.0, 7.0]]),
                         torch.tensor([[2.0, 0.0, 14.0, 11.0]])]

                def call():
                    if levels:
                        return ops.multi_scale_roi_align(feats, boxes, 3, [1.0, 0.5], ratio,
                                                         canonical_scale=8, canonical_level=1,
                                                         aligned=aligned, pool_mode=pool,
                                                         validate_args=False)
                    return ops.roi_align(feats[0], boxes, 3, 1.0, ratio, aligned,
                                         pool_mode=pool, validate_args=False)
                _roi_align_phases(call, phase)
        yield case("roi_align", "coverage 2x24x12x16 (+levels, aligned, max, adaptive)", "both",
                   dtype, run)
    for dtype in ("bf16", "fp64"):
        def run(phase, dtype=dtype):
            for act, dense, flags in _product(("none", "sigmoid", "softmax"), (False, True),
                                              (False, True)):
                if dtype == "fp64" and flags:
                    continue  # the fp64 variants only differ in ACC
                x = _empty((2, 5, 8, 8), dtype, False, True)
                t = (torch.zeros((2, 5, 8, 8), dtype=torch.float32) if dense
                     else torch.zeros((2, 8, 8), dtype=torch.int64))
                with phase("fwd"):
                    sums = ops.overlap_sums(x, t, activation=act, ignore_index=255,
                                            squared=flags,
                                            intersection="min" if flags else "product",
                                            validate_args=False)
                with phase("bwd"):
                    sums.sum().backward()
        yield case("overlap", "coverage 2x5x8^2 (activations, targets, flags)", "nchw", dtype,
                   run)

    for dtype in ("fp32", "fp16"):
        def run(phase, dtype=dtype):
            # one class (binary Dice/Jaccard): triton 3.8 crashed compiling the
            # forward's per-thread pixel groups there (35 pixels: a pixel count
            # that is not a multiple of 16, as the crash needs)
            x = _empty((2, 1, 5, 7), dtype, False, True)
            with phase("fwd"):
                loss = ops.dice_loss(x, torch.zeros((2, 1, 5, 7)), "binary",
                                     validate_args=False)
            with phase("bwd"):
                loss.backward()
        yield case("overlap", "coverage 2x1x5x7 (binary)", "nchw", dtype, run)

    def run(phase):
        # more than 256 classes: softmax in class chunks (both backward schedules)
        for squared, intersection in ((False, "product"), (True, "product"), (False, "min")):
            x = _empty((2, 300, 4, 4), "bf16", False, True)
            with phase("fwd"):
                sums = ops.overlap_sums(x, torch.zeros((2, 4, 4), dtype=torch.int64),
                                        squared=squared, intersection=intersection,
                                        validate_args=False)
            with phase("bwd"):
                sums.sum().backward()
    yield case("overlap", "coverage 2x300x4^2 (class chunks)", "nchw", "bf16", run)

    def run(phase):
        t = torch.zeros((2, 8, 8), dtype=torch.int64)
        for C in (5, 60):
            with phase("fwd"):
                ops.confusion_matrix(torch.zeros((2, 8, 8), dtype=torch.uint8), t, C, 255,
                                     validate_args=False)
                ops.confusion_matrix(_empty((2, C, 8, 8), "fp16", False), t, C, 255,
                                     validate_args=False)
        with phase("fwd"):   # the scores' other averages, and of a float matrix
            for average in ("micro", "macro", "weighted", "none"):
                ops.dice_score(torch.zeros((60, 60), dtype=torch.int64), average)
                ops.iou_score(torch.zeros((60, 60), dtype=torch.float32), average)
    yield case("overlap", "coverage confusion 5 and 60 classes, labels and scores", "nchw",
               "fp16", run)
    yield from _detection_coverage(case)


def _detection_coverage(case):
    """Box and mask kernels in the dtypes no benchmark runs: float64 (its
    bit-cast scalars and thresholds), half inputs (float32 arithmetic), bool
    and float GT masks."""
    import torch
    from segops import ops
    for dtype in ("fp64", "bf16", "fp16"):
        def boxes_run(phase, dtype=dtype):
            b = _empty((70, 4), dtype, False)
            with phase("fwd"):
                ops.box_iou(b, b[:9])
                ops.decode_boxes(_empty((70, 12), dtype, False), b, (10.0, 10.0, 5.0, 5.0))
                ops.decode_boxes(_empty((70, 12), dtype, False), b, image_size=(50, 60))
                ops.clip_boxes_to_image(b, (50, 60))
                ops.batched_nms(b, _empty((70,), dtype, False), torch.arange(70) % 3, 0.5)
        yield case("boxes", "coverage 70 boxes, 3 classes", "rows", dtype, boxes_run)

        def masks_run(phase, dtype=dtype):
            masks, boxes = _empty((5, 1, 7, 7), dtype, False), _empty((5, 4), dtype, False)
            gt = torch.empty((3, 20, 24), dtype=torch.bool)
            with phase("fwd"):
                ops.paste_masks(masks, boxes, (20, 24))
                ops.paste_masks(masks, boxes, (20, 24), threshold=0.5)
                ops.mask_targets(gt, boxes, torch.zeros(5, dtype=torch.int64), 4,
                                 validate_args=False)
                ops.mask_targets(gt.to(_torch_dtype(dtype)), boxes,
                                 torch.zeros(5, dtype=torch.int32), 4, validate_args=False)
        yield case("masks", "coverage 5 masks, bool and float GT masks", "nchw", dtype, masks_run)


def _layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "nchw"


def _product(*iterables):
    import itertools
    return itertools.product(*iterables)


OPS = ("conv", "conv_transpose", "roi_align", "overlap", "boxes", "masks")

# The CI gate's subset (--ci), chosen to stay within a few minutes on two
# cores from a cold cache (the full report compiles ~1 500 binaries, ~40 CPU
# minutes today, most of it ptxas on the variants that spill):
# * one shape per family and specialisation: every dilated ASPP/ResNet shape
#   specialises alike (C, H, W, dilation neither 1 nor a multiple of 16), so
#   "aspp os16 d12" stands for them, but for the forward: at output stride
#   16 it splits its reduction (fp32 partials, another binary), so "layer3
#   d2" adds the forward as the other shapes run it; U-Net's k2 s2 for the k == stride
#   kernel; the decoder for the stride-residue gather; FCN-8s's 21-channel
#   upscore8 (conv.padded_channels: its GEMMs run on 32 zero-padded channels);
#   RoIAlign's box head; the 21-class Dice;
# * dtypes and layouts: bf16 in both layouts, TF32 and fp16 in fewer;
# * configs (see ci_keeps): every tuner config of the bf16 channels_last GEMMs
#   (convolutions', and transposed convolutions' through the conv kernels) and
#   of the TF32 channels_last forward, elsewhere the fixed config and the
#   tuner's first (largest) tile; configs the tuner prunes are not compiled.
CI_CASES = {
    # (op, shape name prefix): {(dtype, layout), ...}
    ("conv", "aspp os16 d12 "): {("bf16", "channels_last"), ("bf16", "nchw"),
                                 ("fp32", "channels_last"), ("fp16", "channels_last")},
    ("conv", "layer3 d2 "): {("bf16", "channels_last"), ("bf16", "nchw"), ("fp32", "channels_last")},
    ("conv", "aspp-sep os16 d12 dw"): {("bf16", "channels_last"), ("bf16", "nchw")},
    ("conv_transpose", "unet up 512@64"): {("bf16", "channels_last"), ("bf16", "nchw"),
                                           ("fp32", "channels_last")},
    ("conv_transpose", "decoder overlap"): {("bf16", "channels_last")},
    ("conv_transpose", "fcn8s upscore8"): {("bf16", "channels_last"), ("fp32", "channels_last")},
    ("roi_align", "roi_align box"): {("bf16", "channels_last"), ("bf16", "nchw"),
                                     ("fp32", "channels_last")},
    ("roi_align", "multi_scale box"): {("bf16", "channels_last")},
    ("overlap", "16x21x"): {("bf16", "nchw"), ("bf16", "channels_last"), ("fp32", "nchw")},
    ("boxes", ""): {("fp32", "rows")},  # every case: a few small binaries
    ("masks", ""): {("fp32", "nchw")},
}
CI_ALL_CONFIGS = {  # (op, family, dtype, layout)
    *[(op, family, "bf16", "channels_last") for op in ("conv", "conv_transpose")
      for family in ("conv fwd", "conv grad_input", "conv grad_weight")],
    ("conv", "conv fwd", "tf32", "channels_last"),
    ("conv_transpose", "conv_transpose k==s", "bf16", "channels_last"),
}


# CI cases of which only some kernel families are compiled: (op, shape prefix) -> families
CI_ONLY_FAMILIES = {("conv", "layer3 d2 "): ("conv fwd",)}


def ci_keeps(launch) -> bool:
    """Whether the CI subset compiles this launch (its case is in CI_CASES)."""
    if launch.suite != "bench":
        return True
    if launch.pruned:
        return False
    for (op, prefix), families in CI_ONLY_FAMILIES.items():
        if launch.op == op and launch.shape.startswith(prefix) and launch.family not in families:
            return False
    return (launch.source == "fixed" or launch.config_index == 0
            or (launch.op, launch.family, launch.dtype, launch.layout) in CI_ALL_CONFIGS)


def _in_ci(case) -> bool:
    return case.suite != "bench" or any(
        case.op == op and case.shape.startswith(prefix) and (case.dtype, case.layout) in kept
        for (op, prefix), kept in CI_CASES.items())


def cases(ops=OPS, ci=False, coverage=True) -> list[Case]:
    makers = {"conv": _conv_cases, "conv_transpose": _conv_transpose_cases,
              "roi_align": _roi_align_cases, "overlap": _overlap_cases,
              "boxes": _boxes_cases, "masks": _masks_cases}
    out = []
    for op in ops:
        out += list(makers[op]())
    if coverage:
        out += [c for c in _coverage_cases() if c.op in ops]
    return [c for c in out if _in_ci(c)] if ci else out


# --------------------------------------------------------------------------
# capturing launches
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Launch:
    suite: str
    op: str
    shape: str
    layout: str
    direction: str
    kernel: str
    family: str
    dtype: str
    config: str
    source: str           # "tuned" (an autotune config) or "fixed" (autotuning off)
    pruned: bool          # dropped by the tuner's prune_configs_by
    config_index: int     # position in the tuner's configs (-1: the fixed config)
    num_warps: int
    num_stages: int
    grid: tuple
    key: str              # the compile key: launches with one key share one binary
    # (fn, signature, constexprs, attrs, options): what triton.compile gets
    job: tuple = dataclasses.field(repr=False, default=None)


_NO_CODE = (lambda: None).__code__


class _CudaDevice:
    """Stands in for torch.device('cuda') where a launcher only asks .type."""
    type = "cuda"
    index = 0

    def __repr__(self):
        return "device(type='cuda', index=0)"


def _target(arch: int):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


class Capture:
    """Intercepts every Triton launch made inside it (nothing runs) and
    records it as the JIT would compile it for ``arch``."""

    # constexprs the launchers set only for the interpreter (see kernels/conv.py _mma)
    GPU_CONSTEXPRS = {"UPCAST": False, "APPROX_RCP": True}

    def __init__(self, arch: int = 90):
        self.arch = arch
        self.launches: list[Launch] = []
        self.errors: list[str] = []
        self._context = {}
        self._tuner = None
        self._binders = {}

    # labels the launches of the calls inside it
    @contextlib.contextmanager
    def labels(self, **labels):
        previous = self._context
        self._context = {**previous, **labels}
        try:
            yield
        finally:
            self._context = previous

    def __enter__(self):
        import torch
        from triton.compiler import make_backend
        from triton.runtime import autotuner, jit

        from .. import _dispatch
        import importlib
        import pkgutil

        from .. import kernels
        for info in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(f"{kernels.__name__}.{info.name}")

        self.backend = make_backend(_target(self.arch))
        self._stack = contextlib.ExitStack()
        patch = self._patch
        capture = self

        def jit_run(fn, *args, grid, warmup, **kwargs):
            capture._record(fn, args, kwargs, grid)
            return None

        def tuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            try:
                kept = tuner.prune_configs(kwargs)
            finally:
                tuner.nargs = None
            for index, config in enumerate(tuner.configs):
                capture._tuner = (index, not any(config is k for k in kept))
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    capture._tuner = None
            return None

        def cuda_like(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                args = [_CudaDevice() if isinstance(a, torch.device) else a for a in args]
                kwargs = {k: _CudaDevice() if isinstance(v, torch.device) else v
                          for k, v in kwargs.items()}
                return fn(*args, **kwargs)
            return wrapper

        def h100_programs(device):
            return 4 * SMS

        patch(jit.JITFunction, "run", jit_run)
        patch(autotuner.Autotuner, "run", tuner_run)
        patch(_dispatch, "path_for", lambda device: _dispatch.KERNEL)
        patch(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default for convolutions
        # value checks as on CUDA: device asserts, and the label checks made
        # inside the overlap kernels (their flag stays 0 here)
        from segops import _checks
        patch(_checks, "values_checked_on_device", lambda t: True)
        # kernels do not run here, and the level kernel's output is indices
        # that later host code looks up: recorded, it returns level 0 for
        # every RoI (no launch's arguments depend on the levels' values)
        roi_kernels = importlib.import_module("segops.kernels.roi_align")
        record_levels = roi_kernels.roi_levels

        def roi_levels(rois, thresholds, num_levels):
            record_levels(rois, thresholds, num_levels)
            return rois.clone(), rois.new_zeros(rois.shape[0], dtype=torch.int64)
        patch(roi_kernels, "roi_levels", roi_levels)
        modules = [m for name, m in list(sys.modules.items())
                   if name.startswith("segops.kernels") and m is not None]
        # the launchers' device-dependent choices, wherever they are bound
        replacements = {}
        for module in modules:
            for name in ("launch", "_launch"):  # the GEMM launcher: take its autotune path
                fn = getattr(module, name, None)
                if callable(fn) and "device" in getattr(fn, "__code__", _NO_CODE).co_varnames:
                    replacements.setdefault(id(fn), (fn, cuda_like(fn)))
            for name in ("target_programs", "_target_programs"):  # grid sizes for an H100
                fn = getattr(module, name, None)
                if callable(fn):
                    replacements.setdefault(id(fn), (fn, h100_programs))
            for name in ("multiprocessor_count", "_multiprocessor_count"):
                fn = getattr(module, name, None)
                if callable(fn):
                    replacements.setdefault(id(fn), (fn, lambda index=0: SMS))
        self.autotune_flags = []
        for module in modules:
            for name, value in list(vars(module).items()):
                if id(value) in replacements and value is replacements[id(value)][0]:
                    patch(module, name, replacements[id(value)][1])
                elif name in ("AUTOTUNE", "_AUTOTUNE") and isinstance(value, bool):
                    patch(module, name, value)  # restored on exit
                    self.autotune_flags.append((module, name))
        if not any(name.endswith("launch") for fn, _ in replacements.values()
                   for name in [fn.__name__]):
            raise RuntimeError("codegen: no GEMM launcher (launch(..., device, ...)) found in "
                               "segops.kernels: update segops/benchmarks/codegen.py")
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _patch(self, owner, name, value):
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._stack.callback(setattr, owner, name, old)

    def autotune(self, enabled: bool):
        """Whether the GEMM launchers take their autotune path (else their
        fixed config)."""
        for module, name in self.autotune_flags:
            setattr(module, name, enabled)

    def _binder(self, fn):
        from triton.runtime.jit import create_function_from_signature
        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params,
                                                               self.backend)
        return self._binders[fn]

    def _record(self, fn, args, kwargs, grid):
        ctx = self._context
        if not ctx.get("record", True):
            return
        kwargs = dict(kwargs)
        for name, value in self.GPU_CONSTEXPRS.items():
            if name in kwargs:
                kwargs[name] = value
        # what JITFunction.run adds before binding
        try:
            from triton import knobs
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        except (ImportError, AttributeError):  # older Triton
            pass
        bound, specialization, options = self._binder(fn)(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound,
                                                              specialization, options)
        if callable(grid):
            grid = grid(bound)
        grid = (tuple(int(g) for g in grid) + (1, 1))[:3]
        name = fn.fn.__name__
        blocks = [f"{p.name.split('_', 1)[1]}{bound[p.name]}" for p in fn.params
                  if p.is_constexpr and p.name.startswith(("BLOCK_", "TILE_"))]
        config = " ".join(blocks + [f"w{options.num_warps}", f"s{options.num_stages}"])
        tuned = self._tuner
        dtype = ctx["dtype"]
        if bound.get("ALLOW_TF32") is True:
            dtype = "tf32"
        job = (fn, signature, constexprs, attrs, options)
        self.launches.append(Launch(
            suite=ctx["suite"], op=ctx["op"], shape=ctx["shape"], layout=ctx["layout"],
            direction=ctx.get("direction", "fwd"), kernel=name, family=FAMILIES.get(name, name),
            dtype=dtype, config=config, source="tuned" if tuned else "fixed",
            pruned=bool(tuned and tuned[1]), config_index=tuned[0] if tuned else -1,
            num_warps=options.num_warps,
            num_stages=options.num_stages, grid=grid, key=_compile_key(job, self.arch), job=job))


# bumped when sass_stats reads something new, so cached variants are re-read
_STATS_VERSION = 3


def _compile_key(job, arch: int) -> str:
    import triton
    from triton.compiler import ASTSource
    fn, signature, constexprs, attrs, options = job
    source = ASTSource(fn, signature, constexprs, attrs).hash()
    opts = sorted((k, repr(v)) for k, v in options.__dict__.items())
    text = json.dumps([triton.__version__, arch, source, opts, _STATS_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def capture(case_list, arch: int = 90, autotune: bool = True, log=None) -> tuple[list, list]:
    """(launches, errors) of running ``case_list``: every launch, once with the
    launchers' autotune path (each tuner config) and once with their fixed
    config."""
    launches, errors = [], []
    with Capture(arch) as cap:
        for case in case_list:
            base = dict(suite=case.suite, op=case.op, shape=case.shape, layout=case.layout,
                        dtype=case.dtype)

            @contextlib.contextmanager
            def phase(direction, record=True):
                with cap.labels(direction=direction, record=record):
                    yield

            first = len(cap.launches)
            tune = autotune and case.suite == "bench"  # coverage: the fixed config only
            for tuned in ((True, False) if tune else (False,)):
                if not tuned and tune and not any(
                        launch.source == "tuned" for launch in cap.launches[first:]):
                    continue  # no autotuned launch: the fixed pass would see the same
                cap.autotune(tuned)
                try:
                    with cap.labels(**base):
                        case.run(phase)
                except Exception as error:  # report the case, go on with the others
                    errors.append(f"{case.op} {case.shape} {case.layout} {case.dtype}: "
                                  f"{type(error).__name__}: {error}")
                    if log:
                        log(f"capture failed: {errors[-1]}")
        launches = cap.launches
    # a launch that is both tuned and fixed (the same config) is listed once per source
    unique, seen = [], set()
    for launch in launches:
        ident = (launch.suite, launch.op, launch.shape, launch.layout, launch.direction,
                 launch.key, launch.source)
        if ident not in seen:
            seen.add(ident)
            unique.append(launch)
    return unique, errors


# --------------------------------------------------------------------------
# compiling and reading the SASS
# --------------------------------------------------------------------------
def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


# (the one lower-case letter in an opcode is a vector width's x: REDG.E.ADD.F32x4)
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.x]*)")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _width(opcode: str) -> int:
    """Bits moved per thread by a global memory instruction."""
    tokens = opcode.split(".")[1:]
    for token in tokens:
        vector = re.fullmatch(r"B?F(16|32|64)[xX_]V?(\d)", token)
        if vector:
            return int(vector.group(1)) * int(vector.group(2))
    if "128" in tokens:
        return 128
    if {"64", "F64", "U64", "S64"} & set(tokens):
        return 64
    if {"U16", "S16", "F16", "BF16"} & set(tokens):
        return 16
    if {"U8", "S8"} & set(tokens):
        return 8
    return 32


_BRANCH = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:`\()?0x([0-9a-f]+)")


def _largest_loop(sass: str) -> tuple[int, int] | None:
    """(first, last) address of the largest loop body: the span of the
    longest backward branch (a GEMM's main loop), or None."""
    spans = [(int(target, 16), int(at, 16)) for at, target in _BRANCH.findall(sass)]
    spans = [(lo, hi) for lo, hi in spans if hi > lo]
    return max(spans, key=lambda span: span[1] - span[0], default=None)


_LOAD_AT = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?LDG[.\s]")


def _loop_loads(sass: str, loop: tuple[int, int] | None) -> int:
    """Synchronous global loads (LDG) inside ``loop``."""
    if loop is None:
        return 0
    return sum(loop[0] <= int(at, 16) <= loop[1] for at in _LOAD_AT.findall(sass))


def sass_stats(sass: str) -> dict:
    """Instruction counts (static, in the binary) that say how a kernel uses
    the machine."""
    counts = collections.Counter(_OPCODE.findall(sass))
    s = collections.Counter()
    for opcode, n in counts.items():
        base = opcode.split(".")[0]
        if base == "LDG":
            s[f"ld{_width(opcode)}"] += n
            s["ld_global"] += n
        elif base == "STG":
            s[f"st{_width(opcode)}"] += n
            s["st_global"] += n
        elif base == "LDGSTS":
            s["ldgsts"] += n
            s[f"async{_width(opcode)}"] += n
        elif base in ("UTMALDG", "UBLKCP", "UTMAPF"):
            s["tma"] += n
        elif base in ("RED", "ATOM", "ATOMG", "REDG"):
            s["atomics"] += n
            s[f"atomic{_width(opcode)}"] += n
        elif base == "HGMMA":
            s["hgmma"] += n
        elif base == "HMMA":
            s["hmma"] += n
        elif base == "MUFU":
            s["mufu"] += n
            s[f"mufu_{opcode.split('.')[1].lower()}"] += n
        elif base == "STL":
            s["spill_stores"] += n
        elif base == "LDL":
            s["spill_loads"] += n
        elif base in ("FFMA", "DFMA", "HFMA2"):
            s[base.lower()] += n
    s["instructions"] = sum(counts.values())
    loop = _largest_loop(sass)
    s["loop_instructions"] = 0 if loop is None else (loop[1] - loop[0]) // 16 + 1
    s["loop_ld_global"] = _loop_loads(sass, loop)
    out = dict(s)
    for key in ("ld128", "ld64", "ld32", "ld16", "ld8", "st128", "st64", "st32", "st16", "st8",
                "ldgsts", "tma", "hgmma", "hmma", "mufu", "atomics", "spill_stores",
                "spill_loads", "ld_global", "st_global", "loop_ld_global"):
        out.setdefault(key, 0)
    out["tensor_core"] = out["hgmma"] + out["hmma"]
    out["async_copies"] = out["ldgsts"] + out["tma"]
    out["spills"] = out["spill_stores"] + out["spill_loads"]
    return out


def compile_stats(job, arch: int) -> dict:
    """Compile one launch for ``arch`` and read its cubin."""
    import triton
    from triton.compiler import ASTSource
    fn, signature, constexprs, attrs, options = job
    started = time.time()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(arch),
                            options=options.__dict__)
    seconds = time.time() - started
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    match = _RESOURCES.search(usage)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[-500:]}")
    regs, stack, static_smem, local = map(int, match.groups())
    stats = sass_stats(sass)
    stats.update(regs=regs, stack=stack, local=local, smem=int(kernel.metadata.shared),
                 smem_static=static_smem, compile_s=round(seconds, 2))
    return stats


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM of an H100 from registers, shared memory and
    threads (0: the CTA does not fit at all)."""
    if smem > SMEM_PER_CTA:
        return 0
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_threads = MAX_THREADS_PER_SM // (32 * num_warps)
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    return max(0, min(MAX_CTAS_PER_SM, by_regs, by_threads, by_smem))


_JOBS = []  # the worker processes read their job here (inherited through fork)


def _compile_job(index_arch):
    index, arch = index_arch
    try:
        return index, compile_stats(_JOBS[index], arch), None
    except Exception as error:  # reported per variant
        cause = f" (cause: {error.__cause__!r})" if error.__cause__ else ""
        return index, None, f"{type(error).__name__}: {str(error)[-2000:]}{cause}"


def compile_all(launches, arch: int = 90, jobs: int | None = None, cache_dir=None,
                log=None) -> tuple[dict, dict]:
    """({key: stats}, {key: error}) for every distinct compile key, using and
    filling the on-disk cache."""
    import triton
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"triton-{triton.__version__}-sm{arch}"
        cache.mkdir(parents=True, exist_ok=True)
    stats, errors, todo = {}, {}, {}
    for launch in launches:
        if launch.key in stats or launch.key in todo:
            continue
        path = cache / f"{launch.key}.json" if cache else None
        if path is not None and path.exists():
            try:
                stats[launch.key] = json.loads(path.read_text())
                continue
            except (OSError, ValueError):
                pass
        todo[launch.key] = launch.job
    if log:
        log(f"{len(stats) + len(todo)} distinct binaries: {len(stats)} cached, "
            f"{len(todo)} to compile")
    keys = list(todo)
    _JOBS[:] = [todo[k] for k in keys]
    jobs = max(1, jobs or os.cpu_count() or 1)
    started = time.time()

    def done(index, result, error):
        key = keys[index]
        if error is not None:
            errors[key] = error
            return
        stats[key] = result
        if cache is not None:
            tmp = cache / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(result))
            tmp.replace(cache / f"{key}.json")

    if jobs == 1 or len(keys) <= 1:
        for i in range(len(keys)):
            done(*_compile_job((i, arch)))
    else:
        import concurrent.futures
        import multiprocessing
        # an executor, not multiprocessing.Pool: a compiler that crashes its
        # worker (triton 3.8's SIGSEGV on one-class Dice tiles did) breaks the
        # executor, where a Pool waits for the lost result forever
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_compile_job, (i, arch)) for i in range(len(keys))]
            try:
                for n, future in enumerate(concurrent.futures.as_completed(futures)):
                    done(*future.result())
                    if log and (n + 1) % 50 == 0:
                        log(f"  compiled {n + 1}/{len(keys)} ({time.time() - started:.0f} s)")
            except concurrent.futures.process.BrokenProcessPool as error:
                raise RuntimeError("a compile killed its worker process (a compiler crash); "
                                   "rerun with --jobs 1 to see which kernel") from error
    _JOBS[:] = []
    if log and keys:
        log(f"compiled {len(keys)} in {time.time() - started:.0f} s")
    return stats, errors


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------
def rows(launches, stats, errors) -> list[dict]:
    """One object per variant (launch) with the report's keys."""
    out = []
    for launch in launches:
        row = {"kernel": launch.kernel, "family": launch.family, "op": launch.op,
               "suite": launch.suite, "shape": launch.shape, "layout": launch.layout,
               "direction": launch.direction, "dtype": launch.dtype, "config": launch.config,
               "source": launch.source, "pruned": launch.pruned,
               "num_warps": launch.num_warps, "num_stages": launch.num_stages,
               "grid": list(launch.grid), "ctas": launch.grid[0] * launch.grid[1]
               * launch.grid[2], "key": launch.key}
        if launch.key in stats:
            s = stats[launch.key]
            row.update(s)
            row["smem_total"] = s["smem"] + s.get("smem_static", 0)
            row["ctas_per_sm"] = ctas_per_sm(s["regs"], row["smem_total"], launch.num_warps)
            row["error"] = None
        else:
            row.update({k: None for k in KEYS if k not in row})
            row["error"] = errors.get(launch.key, "not compiled")
        out.append(row)
    return out


# --------------------------------------------------------------------------
# the gate's checks (tests/test_codegen.py): what a shipped fast path must show
# --------------------------------------------------------------------------
VECTOR_STORES = ("roi_align fwd", "roi_align bwd deterministic", "overlap bwd")


def _vector_short(r) -> bool:
    """No 128-bit global load on the data path; for kernels that write a
    tile, no 128-bit store; for the atomic RoIAlign backward, only scalar
    atomics; for the store-bound kernels, no 128-bit store."""
    if r["family"] in STORE_BOUND:
        return r["st128"] == 0
    if r["ld128"] == 0:
        return True
    if r["family"] in VECTOR_STORES and r["st128"] == 0:
        return True
    return r["family"] == "roi_align bwd atomic" and r["atomics"] == r.get("atomic32", 0)


# families whose activation (softmax/sigmoid) must cost one exp per element
ONE_EXP = ("overlap fwd", "overlap bwd")


def elements_per_thread(r) -> int:
    """Elements of a [BLOCK_C, BLOCK_S] tile each thread holds (config
    "C32 S128 w8 s3")."""
    blocks = dict(re.findall(r"\b([A-Z])(\d+)\b", r["config"]))
    return int(blocks["C"]) * int(blocks["S"]) // (32 * r["num_warps"])


def _exp_short(r) -> bool:
    """More MUFU.EX2 in the binary than one per element of a tile (plus 4:
    a loop over class chunks, the chunked path's per-pixel rescaling)."""
    return r.get("mufu_ex2", 0) > elements_per_thread(r) + 4


CHECKS = {
    # name: (which shipped variants it applies to, falls_short(row), what it asks)
    "spills": (lambda r: True,
               lambda r: r["spills"] > 0 or r["stack"] > 0,
               "no spill stores/loads and no stack"),
    "smem": (lambda r: True,
             lambda r: r["smem_total"] > SMEM_PER_CTA,
             "shared memory fits an H100 CTA (227 KB); else prune the config before tuning"),
    "tensor_core": (lambda r: r["family"] in GEMM_FAMILIES and r["dtype"] in ("bf16", "fp16",
                                                                               "tf32"),
                    lambda r: r["tensor_core"] == 0,
                    "bf16/fp16/TF32 GEMMs use tensor cores (HGMMA/HMMA)"),
    "async": (lambda r: r["family"] in GEMM_FAMILIES and r["layout"] == "channels_last",
              lambda r: r["async_copies"] == 0 or r["loop_ld_global"] > 0,
              "channels_last GEMMs load both operands asynchronously (no LDG in the "
              "main loop; the prologue's table loads and the epilogue's bias are LDG)"),
    "async_width": (lambda r: r["family"] in GEMM_FAMILIES and r["layout"] == "channels_last",
                    lambda r: r.get("async32", 0) + r.get("async64", 0) > 0,
                    "their async copies move 16 bytes (no 4- or 8-byte LDGSTS)"),
    "vector": (lambda r: MEMORY_BOUND_FAST_LAYOUT.get(r["family"]) == r["layout"],
               _vector_short,
               "memory-bound kernels use 128-bit accesses in their fast layout"),
    "exp": (lambda r: r["family"] in ONE_EXP, _exp_short,
            "one exp per element of a tile (MUFU.EX2 <= elements per thread + 4)"),
}


def shipped(report) -> list[dict]:
    """The fast paths the gate checks: benchmark variants a launch can run
    (configs the tuner prunes never run), compiled."""
    return [r for r in report if r["suite"] == "bench" and not r["pruned"] and not r["error"]]


def shortfalls(report) -> dict:
    """{check: [rows that fall short]} over the shipped variants."""
    rows_ = shipped(report)
    return {name: [r for r in rows_ if applies(r) and short(r)]
            for name, (applies, short, _) in CHECKS.items()}


def pin_config(r) -> str:
    return "fixed" if r["source"] == "fixed" else r["config"]


def suggest_pins(report) -> str:
    """KNOWN_SHORTFALLS entries (tests/test_codegen.py) for what falls short
    now: one per (check, family, dtype, layout), config "*" where every
    config falls short, shape "*" where every shape does."""
    rows_ = shipped(report)
    lines = []
    for name, failing in shortfalls(report).items():
        applies = CHECKS[name][0]
        groups = collections.OrderedDict()
        for r in failing:
            groups.setdefault((r["family"], r["dtype"], r["layout"]), []).append(r)
        for (family, dtype, layout), bad in groups.items():
            every = [r for r in rows_ if applies(r) and (r["family"], r["dtype"], r["layout"])
                     == (family, dtype, layout)]
            bad_ids = {id(r) for r in bad}
            if len(bad) == len(every):
                entries = [("*", "*")]
            else:
                entries = []
                for config in sorted({pin_config(r) for r in bad}):
                    of_config = [r for r in every if pin_config(r) == config]
                    if all(id(r) in bad_ids for r in of_config):
                        entries.append((config, "*"))
                    else:
                        entries += [(config, r["shape"]) for r in of_config
                                    if id(r) in bad_ids]
            for config, shape in dict.fromkeys(entries):
                lines.append(f'    ("{name}", "{family}", "{dtype}", "{layout}", "{config}", '
                             f'"{shape}", "why"),')
    return "\n".join(lines)


LAYOUT_NAMES = {"channels_last": "NHWC", "nchw": "NCHW"}  # "rows": (N, 4) boxes


def markdown_table(report) -> str:
    """README-ready: one line per shipped (kernel family, dtype, layout,
    config), worst case over the benchmark shapes."""
    groups = collections.OrderedDict()
    for r in sorted(shipped(report), key=lambda r: (r["family"], r["dtype"], r["layout"],
                                                    r["source"] == "fixed", r["config"])):
        groups.setdefault((r["family"], r["dtype"], r["layout"], pin_config(r)), []).append(r)
    lines = ["| kernel | dtype | layout | config | regs | spills | smem | CTAs/SM | "
             "tensor cores | async copies | 128-bit loads (sync+async) / stores | loop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (family, dtype, layout, config), group in groups.items():
        worst = max(group, key=lambda r: (r["spills"], r["regs"]))
        loads = ("yes" if worst["async_copies"] and not worst["loop_ld_global"]
                 else "partly" if worst["async_copies"] else "no")
        lines.append(
            f"| {family} | {dtype} | {LAYOUT_NAMES.get(layout, layout)} | "
            f"{config} | {max(r['regs'] for r in group)} | "
            f"{max(r['spills'] for r in group)} | "
            f"{max(r['smem_total'] for r in group) // 1024} KB | "
            f"{min(r['ctas_per_sm'] for r in group)} | "
            f"{'HGMMA' if worst['hgmma'] else 'HMMA' if worst['hmma'] else '-'} | "
            f"{loads} | "
            f"{worst['ld128'] + worst.get('async128', 0)}/{worst['st128']} | "
            f"{max(r.get('loop_instructions', 0) for r in group)} |")
    return "\n".join(lines)


def _kb(n):
    return "-" if n is None else f"{n / 1024:.0f}K"


TABLE_COLUMNS = [
    ("family", 22, lambda r: r["family"]),
    ("dtype", 5, lambda r: r["dtype"]),
    ("layout", 6, lambda r: "cl" if r["layout"] == "channels_last" else r["layout"]),
    ("config", 22, lambda r: r["config"] + ("*" if r["source"] == "fixed" else "")
     + (" (pruned)" if r["pruned"] else "")),
    ("regs", 4, lambda r: r["regs"]),
    ("spill", 5, lambda r: r["spills"]),
    ("stack", 5, lambda r: r["stack"]),
    ("smem", 5, lambda r: _kb(r.get("smem_total"))),
    ("cta/sm", 6, lambda r: r["ctas_per_sm"]),
    ("mma", 4, lambda r: r["tensor_core"]),
    ("async", 5, lambda r: r["async_copies"]),
    ("ld128", 5, lambda r: r["ld128"]),
    ("ld64", 4, lambda r: r.get("ld64")),
    ("ld32", 4, lambda r: r.get("ld32")),
    ("ld16", 4, lambda r: r["ld16"]),
    ("st128", 5, lambda r: r["st128"]),
    ("st32", 4, lambda r: r.get("st32")),
    ("st16", 4, lambda r: r["st16"]),
    ("atom", 4, lambda r: r.get("atomics")),
    ("mufu", 4, lambda r: r["mufu"]),
    ("loop", 4, lambda r: r.get("loop_instructions")),
]


def format_table(report, suites=("bench",)) -> str:
    """One line per distinct binary (the variants that compile to it are
    summed up in the last column: shapes and directions)."""
    groups = collections.OrderedDict()
    for r in report:
        if r["suite"] not in suites:
            continue
        ident = (r["family"], r["dtype"], r["layout"], r["config"], r["source"], r["key"])
        groups.setdefault(ident, []).append(r)
    header = " ".join(f"{name:>{w}}" if i > 3 else f"{name:<{w}}"
                      for i, (name, w, _) in enumerate(TABLE_COLUMNS)) + "  shapes"
    lines = [header, "-" * len(header)]
    order = sorted(groups.values(), key=lambda g: (
        g[0]["family"], g[0]["dtype"], g[0]["layout"], g[0]["source"] == "fixed",
        g[0]["config"]))
    for group in order:
        r = group[0]
        if r["error"]:
            lines.append(f"{r['family']:<22} {r['dtype']:<5} {r['layout']:<6} {r['config']:<22} "
                         f"FAILED: {r['error'].splitlines()[0][:80]}")
            continue
        cells = []
        for i, (name, w, get) in enumerate(TABLE_COLUMNS):
            value = get(r)
            value = "-" if value is None else str(value)
            cells.append(f"{value:>{w}}" if i > 3 else f"{value:<{w}}")
        shapes = sorted({g["shape"].split(" ")[0] + " " + g["shape"].split(" ")[1]
                         if g["op"] != "overlap" else g["shape"] for g in group})
        lines.append(" ".join(cells) + "  " + ", ".join(shapes)[:70])
    lines.append("* the launcher's fixed config (autotuning off); the others are the "
                 "tuner's configs")
    return "\n".join(lines)


def run_report(ops=OPS, ci=False, coverage=True, arch=90, jobs=None, cache_dir=None,
               log=print, all_configs=False) -> tuple[list[dict], list[str]]:
    """(rows, capture errors)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the codegen report compiles: run it without TRITON_INTERPRET=1 "
                           "(the interpreter replaces the compiler)")
    started = time.time()
    case_list = cases(ops, ci, coverage)
    launches, capture_errors = capture(case_list, arch, log=log)
    if ci and not all_configs:
        launches = [launch for launch in launches if ci_keeps(launch)]
    if log:
        log(f"captured {len(launches)} launches from {len(case_list)} cases in "
            f"{time.time() - started:.0f} s")
    stats, errors = compile_all(launches, arch, jobs, cache_dir, log)
    return rows(launches, stats, errors), capture_errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m segops.benchmarks.codegen",
        description="Compile every kernel variant the ops launch at the benchmark shapes for "
                    "sm_90 and report what the SASS shows.")
    parser.add_argument("--json", default=None, help="write one object per variant here")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS,
                        help="benchmark families (default: all)")
    parser.add_argument("--ci", action="store_true",
                        help="the reduced set the CI gate compiles (a few shapes per family)")
    parser.add_argument("--all-configs", action="store_true",
                        help="with --ci: every config of the CI cases (pruned ones included)")
    parser.add_argument("--no-coverage", action="store_true",
                        help="leave out the compile-only coverage variants")
    parser.add_argument("--markdown", action="store_true",
                        help="print a README-ready table of the shipped configs instead")
    parser.add_argument("--pins", action="store_true",
                        help="print KNOWN_SHORTFALLS entries for tests/test_codegen.py that "
                        "pin what falls short now")
    parser.add_argument("--all-rows", action="store_true",
                        help="the table also lists the coverage variants")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: "
                        "one per CPU)")
    parser.add_argument("--cache", default=str(default_cache_dir()),
                        help="cache folder ('' for none; default %(default)s)")
    args = parser.parse_args(argv)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    report, capture_errors = run_report(args.ops, args.ci, not args.no_coverage, args.arch,
                                        args.jobs, args.cache or None, log, args.all_configs)
    suites = ("bench", "coverage") if args.all_rows else ("bench",)
    print(markdown_table(report) if args.markdown else format_table(report, suites))
    failed = sorted({r["kernel"] + " " + r["shape"] + ": " + r["error"] for r in report
                     if r["error"]})
    for name, failing in shortfalls(report).items():
        if failing:
            print(f"{name}: {len(failing)} shipped variants fall short ({CHECKS[name][2]})")
    if args.pins:
        print("KNOWN_SHORTFALLS entries for what falls short now:")
        print(suggest_pins(report))
    for line in capture_errors + failed:
        print(f"ERROR {line}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        log(f"wrote {len(report)} variants to {args.json}")
    return 1 if capture_errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
