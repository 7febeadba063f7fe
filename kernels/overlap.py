"""Fused IoU/Dice reductions.

Six kernels:

* ``_overlap_sums_fwd_kernel``: one pass over logits/probabilities and the
  target that produces, per (sample, class), intersection sum(p*t) (or the
  fuzzy sum(min(p, t)) that segmentation-models-pytorch uses), prediction
  sum sum(p) (or sum(p^2)) and target sum sum(t) (or sum(t^2)). Softmax/sigmoid
  is applied on the fly; index targets are compared with the class id instead
  of being one-hot encoded.
* ``_overlap_sums_bwd_kernel``: the gradient of those sums with respect to the
  logits, recomputing softmax/sigmoid; it needs only the (N, C) upstream
  gradients, so no activation of size N*C*S is ever saved.
* ``_overlap_loss_kernel`` / ``_overlap_loss_bwd_kernel``: the reduced Dice
  or Jaccard loss from the (3, N, C) sums, and its gradient back to them, in
  one small program each (the loss's epilogue of a dozen tiny aten ops, whose
  host cost exceeded the kernels' time, in one launch).
* ``_confusion_matrix_kernel``: a (C, C) histogram of (target, prediction)
  pairs, with argmax of scores fused in.
* ``_confusion_score_kernel``: IoU or Dice per class of that matrix, and
  their micro/macro/weighted average, in one program.

Every tensor is addressed as (n, c, s) with three strides, the spatial dims
merged into one (see ``_layout.flatten_trailing``); the same code therefore
reads NCHW, channels_last and channels_last_3d memory. Pixel offsets within a
sample are 64-bit, so a sample may hold more than 2^31 pixels; the one 32-bit
quantity left is the program id of the flat grids (``check_programs``).

``ignore_index`` follows ``target != ignore_index`` in torch: it is first
converted to the target's dtype (integers wrap, so -1 is 255 for uint8
labels; floats round), then compared exactly with the raw target value.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from .._checks import ArgumentError, accumulation_dtype
from ._layout import (
    block_size,
    cdiv,
    empty,
    empty_like,
    flatten_trailing,
    next_pow2,
    scalar_bits,
    target_programs,
    tl_accumulation,
)
from ._math import div, from_bits

ACTIVATIONS = {"none": 0, "sigmoid": 1, "softmax": 2}
_SOFTMAX = 2
_SIGMOID = 1


# --------------------------------------------------------------------------
# shared tile helpers
# --------------------------------------------------------------------------
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp_shift(m):
    """A pixel's softmax shift as ``_exp_minus`` takes it: m, with an all
    -inf m made 0 (exp(-inf - -inf) would be NaN where the sum of exp must
    stay 0: padded or masked classes)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _exp_minus(x, shift):
    """exp(x - m) for shift = _exp_shift(m). fp32: exp2 of (x - m) * log2(e),
    where tl.exp spends 3 multiplies and a range test around the same
    MUFU.EX2 (ex2.approx, flushing results below 2^-126 to 0). x - m is
    exact for the logits near the maximum that matter; folding the shift
    into one FMA (x * log2(e) - m * log2(e)) saves an instruction but is
    only as exact where the FMA is fused, which the interpreter's is not
    (logits near 3000: 6e-5 relative error in the gradient). fp64 keeps the
    exact exp."""
    if x.dtype == tl.float32:
        return tl.exp2((x - shift) * _LOG2E)
    else:
        return tl.exp(x - shift)


@triton.jit
def _sigmoid_and_slope(x):
    """(sigmoid(x), sigmoid'(x)) with one exp: p = 1 / (1 + exp(-x)) (the
    forward takes p alone and the slope is dead code there). The slope is
    exp(-x) * p^2 for x >= 0, where p * (1 - p) would lose the digits of
    exp(-x) (0 past x ~ 17 in float32), and p * (1 - p) below 0, where p is
    the small factor and exp(-x) may overflow."""
    if x.dtype == tl.float32:
        e = tl.exp2(-x * _LOG2E)
    else:
        e = tl.exp(-x)
    p = 1.0 / (1.0 + e)
    return p, tl.where(x >= 0, e * p * p, p * (1.0 - p))


@triton.jit
def _tile_pointers(row, offs_c, offs_s64, stride_c, stride_s):
    """[BLOCK_C, BLOCK_S] pointers, the pixel term first: the class term
    added last keeps the 2-D sum inside the pixel loop (added first, the
    compiler hoists a loop-invariant 2-D pointer tile: 2 registers per
    element held across the loop)."""
    return (row + offs_s64 * stride_s)[None, :] + offs_c.to(tl.int64)[:, None] * stride_c


@triton.jit
def _load_scores(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC: tl.constexpr):
    """[BLOCK_C, BLOCK_S] tile in the accumulation dtype ACC; classes past C read -inf (so softmax and
    argmax ignore them), pixels past the end read 0 (so every column keeps a
    finite maximum)."""
    cmask = offs_c < C
    ptrs = _tile_pointers(x_row, offs_c, offs_s64, stride_xc, stride_xs)
    x = tl.load(ptrs, mask=cmask[:, None] & smask[None, :], other=0.0)
    return tl.where(cmask[:, None], x.to(ACC), float("-inf"))


@triton.jit
def _softmax_stats(x_row, C, offs_s64, smask, stride_xc, stride_xs,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """Per-pixel running max and sum of exp over all classes, chunk by chunk."""
    m = tl.full([BLOCK_S], float("-inf"), ACC)
    l = tl.zeros([BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = _load_scores(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = _exp_shift(m_new)
        # exp(m - m_new) rescales the running sum (0 while m is -inf)
        l = l * _exp_minus(m, shift) + tl.sum(_exp_minus(x, shift[None, :]), axis=0)
        m = m_new
    return m, l


@triton.jit
def _softmax_stats_and_dot(x_row, t_row, gi_row, gp_row, C, offs_s64, smask, ignore_index,
                           stride_xc, stride_xs, stride_tc, stride_ts,
                           DENSE_TARGET: tl.constexpr, HAS_IGNORE: tl.constexpr,
                           SQUARED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                           ACC: tl.constexpr):
    """(m, l, dot) of every pixel in one pass over the class chunks, for the
    product intersection: with e = exp(x - m) and p = e / l, dL/dp is
    gi*t + gp (linear) or gi*t + 2*gp*p (squared), so dot = sum_c g_c p_c is
    a / l + 2 * b / l^2 with a = sum (gi*t [+ gp]) e and b = sum gp e^2,
    rescaled like l whenever the running max m grows."""
    m = tl.full([BLOCK_S], float("-inf"), ACC)
    l = tl.zeros([BLOCK_S], ACC)
    a = tl.zeros([BLOCK_S], ACC)
    b = tl.zeros([BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = _load_scores(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
        t, valid = _load_target(t_row, offs_c, offs_s64, C, smask, ignore_index,
                                stride_tc, stride_ts, DENSE_TARGET, HAS_IGNORE, ACC)
        cmask = offs_c < C
        gi = tl.load(gi_row + offs_c, mask=cmask, other=0.0)
        gp = tl.load(gp_row + offs_c, mask=cmask, other=0.0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = _exp_shift(m_new)
        alpha = _exp_minus(m, shift)  # the running sums' rescale
        e = _exp_minus(x, shift[None, :])
        l = l * alpha + tl.sum(e, axis=0)
        if SQUARED:
            a = a * alpha + tl.sum(tl.where(valid, gi[:, None] * t * e, 0.0), axis=0)
            b = b * (alpha * alpha) + tl.sum(tl.where(valid, gp[:, None] * e * e, 0.0), axis=0)
        else:
            a = a * alpha + tl.sum(tl.where(valid, (gi[:, None] * t + gp[:, None]) * e, 0.0),
                                   axis=0)
        m = m_new
    dot = a / l
    if SQUARED:
        dot += 2.0 * b / (l * l)
    return m, l, dot


@triton.jit
def _probabilities(x, m, l, ACTIVATION: tl.constexpr):
    """(p, slope) of a score tile; softmax with the per-pixel max m and sum
    of exp l over all classes (from _softmax_stats). The slope is what
    ``_store_grad_logits`` multiplies by: p for softmax, sigmoid'(x) for
    sigmoid, unused (1) without an activation."""
    if ACTIVATION == 2:
        p = _exp_minus(x, _exp_shift(m)[None, :]) / l[None, :]
        slope = p
    elif ACTIVATION == 1:
        p, slope = _sigmoid_and_slope(x)
    else:
        p = x
        slope = tl.full(x.shape, 1.0, x.dtype)
    return p, slope


@triton.jit
def _softmax_tile(x):
    """Softmax over axis 0 of a tile that holds every class of its pixels:
    one exp per element and one reciprocal per pixel (padded classes are
    -inf and give 0)."""
    e = _exp_minus(x, _exp_shift(tl.max(x, axis=0))[None, :])
    return e * (1.0 / tl.sum(e, axis=0))[None, :]


@triton.jit
def _tile_probabilities(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs,
                        ACTIVATION: tl.constexpr, ONE_CHUNK: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """(p, slope) of the [BLOCK_C, BLOCK_S] tile at (offs_c, offs_s64), the
    slope as ``_probabilities`` gives it. With ONE_CHUNK (C <= BLOCK_C) the
    logits are read once; otherwise softmax first makes its statistics over
    every chunk of classes."""
    x = _load_scores(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
    if ACTIVATION == 2 and ONE_CHUNK:
        p = _softmax_tile(x)
        slope = p
    elif ACTIVATION == 2:
        m, l = _softmax_stats(x_row, C, offs_s64, smask, stride_xc, stride_xs,
                              BLOCK_C, BLOCK_S, ACC)
        p, slope = _probabilities(x, m, l, ACTIVATION)
    else:
        p, slope = _probabilities(x, 0.0, 1.0, ACTIVATION)
    return p, slope


@triton.jit
def _reciprocal(l, APPROX_RCP: tl.constexpr):
    """1 / l. APPROX_RCP (fp32, compiled for a GPU): one MUFU.RCP where
    ``1 / l`` is an accurate division of some ten instructions, paid per pixel
    on every lane that holds a class of it; both are within 2 ulp for the
    softmax sums this takes (1 <= l <= C, or 0, or NaN). The interpreter has
    no libdevice: it divides."""
    if APPROX_RCP and l.dtype == tl.float32:
        return libdevice.fast_dividef(1.0, l)
    else:
        return 1.0 / l


@triton.jit
def _pixel_labels(t_row, offs_s64, smask, ignore_index, stride_ts, HAS_IGNORE: tl.constexpr):
    """(raw labels, whether each pixel counts: before the end and not
    ignored) of index targets."""
    raw = tl.load(t_row + offs_s64 * stride_ts, mask=smask, other=0)
    counts = smask
    if HAS_IGNORE:
        counts = counts & ~_is_ignored(raw, ignore_index)
    return raw, counts


@triton.jit
def _load_scores_or_minus_inf(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs,
                              ACC: tl.constexpr):
    """[BLOCK_C, BLOCK_S] scores in ACC; classes and pixels past the end
    read -inf, so exp gives 0 there without a select per element (a pixel
    past the end has every class -inf: see _exp_shift)."""
    ptrs = _tile_pointers(x_row, offs_c, offs_s64, stride_xc, stride_xs)
    x = tl.load(ptrs, mask=(offs_c < C)[:, None] & smask[None, :], other=float("-inf"))
    return x.to(ACC)


@triton.jit
def _softmax_onehot_tile(x_row, t_row, offs_c, offs_s64, C, smask, ignore_index,
                         stride_xc, stride_xs, stride_ts, HAS_IGNORE: tl.constexpr,
                         APPROX_RCP: tl.constexpr, ACC: tl.constexpr):
    """(p, t) of a tile holding every class of its pixels, for index targets:
    softmax probabilities, zero in pixels that do not count (past the end,
    ignored), and the one-hot target. The masks are applied per pixel, not
    per element: classes and pixels past the end read -inf (exp gives 0),
    the softmax scale of a pixel that does not count is 0, and its label is
    -1 (no class). A pixel that counts with every logit -inf gets NaN, as
    torch.softmax gives."""
    raw, counts = _pixel_labels(t_row, offs_s64, smask, ignore_index, stride_ts, HAS_IGNORE)
    label = tl.where(counts, raw.to(tl.int64), -1)
    x = _load_scores_or_minus_inf(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
    if HAS_IGNORE:
        # per element: a NaN logit of an ignored pixel must not reach the
        # sums (0 * NaN), and a label-dependent load mask would break the
        # vector loads
        x = tl.where(counts[None, :], x, float("-inf"))
    e = _exp_minus(x, _exp_shift(tl.max(x, axis=0))[None, :])
    scale = tl.where(counts, _reciprocal(tl.sum(e, axis=0), APPROX_RCP), 0.0)
    p = e * scale[None, :]
    t = (label[None, :] == offs_c[:, None]).to(ACC)
    return p, t


@triton.jit
def _is_ignored(raw, ignore_index):
    """raw == ignore_index as torch compares them: in raw's own dtype.
    Integer ignore values arrive already wrapped into raw's range (host side),
    so the int64 comparison is exact; float targets get ignore_index rounded
    to their dtype (through float32, as torch converts an int to a half)."""
    if raw.dtype.is_floating():
        if raw.dtype == tl.float64:
            value = tl.full([1], ignore_index, tl.float64)
        else:
            value = tl.full([1], ignore_index, tl.float32).to(raw.dtype)
        return raw == value
    else:
        return raw.to(tl.int64) == ignore_index


@triton.jit
def _load_target(t_row, offs_c, offs_s64, C, smask, ignore_index,
                 stride_tc, stride_ts,
                 DENSE_TARGET: tl.constexpr, HAS_IGNORE: tl.constexpr, ACC: tl.constexpr):
    """Target tile [BLOCK_C, BLOCK_S] in ACC and the mask of elements that
    count. Index targets become one-hot by comparison, never in memory."""
    cmask = offs_c < C
    valid = cmask[:, None] & smask[None, :]
    if DENSE_TARGET:
        ptrs = _tile_pointers(t_row, offs_c, offs_s64, stride_tc, stride_ts)
        raw = tl.load(ptrs, mask=valid, other=0)
        if HAS_IGNORE:
            valid = valid & ~_is_ignored(raw, ignore_index)
        t = tl.where(valid, raw.to(ACC), 0.0)
    else:
        raw = tl.load(t_row + offs_s64 * stride_ts, mask=smask, other=0)
        if HAS_IGNORE:
            valid = valid & ~_is_ignored(raw, ignore_index)[None, :]
        label = raw.to(tl.int64)
        t = tl.where(valid & (label[None, :] == offs_c[:, None]), 1.0, 0.0).to(ACC)
    return t, valid


@triton.jit
def _out_of_range(raw, smask, C, ignore_index, HAS_IGNORE: tl.constexpr):
    """Which of the labels ``raw`` lie outside [0, C) (compared at their
    full width) and are not ``ignore_index``."""
    label = raw.to(tl.int64)
    bad = smask & ((label < 0) | (label >= C))
    if HAS_IGNORE:
        bad = bad & ~_is_ignored(raw, ignore_index)
    return bad


@triton.jit
def _count(mask):
    return tl.sum(mask.to(tl.int32), axis=0)


@triton.jit
def _bad_labels_in(t_row, s_begin, s_end, C, ignore_index, stride_ts, HAS_IGNORE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """How many of the labels of pixels [s_begin, s_end) are out of range
    (at most BLOCK: a per-lane flag, counted once)."""
    bad = tl.zeros([BLOCK], tl.int1)
    for s0 in range(s_begin, s_end, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        smask = offs < s_end
        raw = tl.load(t_row + offs * stride_ts, mask=smask, other=0)
        bad = bad | _out_of_range(raw, smask, C, ignore_index, HAS_IGNORE)
    return _count(bad)


@triton.jit
def _flag_bad_labels(flag_ptr, count):
    """Set the flag (an int32 the launcher zeroed) when ``count`` > 0. The
    callers count at most one block's pixels, so the count cannot wrap."""
    tl.atomic_max(flag_ptr, 1, mask=count > 0)


@triton.jit
def _add_triples(a_i, a_p, a_t, b_i, b_p, b_t):
    return a_i + b_i, a_p + b_p, a_t + b_t


# --------------------------------------------------------------------------
# forward: per-(sample, class) sums
# --------------------------------------------------------------------------
@triton.jit
def _overlap_sums_fwd_kernel(
    x_ptr, t_ptr, part_ptr, bad_ptr,
    C, S, S_PER_PROG, ignore_index,
    stride_xn, stride_xc, stride_xs,
    stride_tn, stride_tc, stride_ts,
    ACTIVATION: tl.constexpr, DENSE_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr, SQUARED: tl.constexpr, MIN_INTERSECTION: tl.constexpr,
    CHECK_LABELS: tl.constexpr, LABEL_BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, GROUP: tl.constexpr,
    PIXEL_MASKS: tl.constexpr, APPROX_RCP: tl.constexpr, ACC: tl.constexpr,
):
    # Program (n, p) reduces pixels [p*S_PER_PROG, (p+1)*S_PER_PROG) of sample
    # n into its own row of `part` [3, N, P, C]; the host sums over P. No
    # atomics, so the result is bit-identical run to run. CHECK_LABELS (index
    # targets): flag labels outside [0, C) in bad_ptr, in a pass over the
    # program's labels before the sums.
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    num_n = tl.num_programs(0)
    num_p = tl.num_programs(1)
    x_row = x_ptr + pid_n.to(tl.int64) * stride_xn
    t_row = t_ptr + pid_n.to(tl.int64) * stride_tn
    s_begin = pid_p.to(tl.int64) * S_PER_PROG
    s_end = tl.minimum(s_begin + S_PER_PROG, S)
    part_row = part_ptr + (pid_n * num_p + pid_p).to(tl.int64) * C
    plane = (num_n * num_p).to(tl.int64) * C
    if CHECK_LABELS:
        # a pass of its own over the program's labels, flagged before the
        # sums: nothing of it stays live in their loop (checked inside that
        # loop, the labels cost registers and occupancy on sm_90: 64 -> 102
        # registers at 150 classes, bf16 NCHW)
        _flag_bad_labels(bad_ptr, _bad_labels_in(t_row, s_begin, s_end, C, ignore_index,
                                                 stride_ts, HAS_IGNORE, LABEL_BLOCK))

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        acc_i = tl.zeros([BLOCK_C, BLOCK_S // GROUP], ACC)
        acc_p = tl.zeros([BLOCK_C, BLOCK_S // GROUP], ACC)
        acc_t = tl.zeros([BLOCK_C, BLOCK_S // GROUP], ACC)
        for s0 in range(s_begin, s_end, BLOCK_S):
            offs_s64 = s0 + tl.arange(0, BLOCK_S)  # int64, as s_begin is
            smask = offs_s64 < s_end
            if PIXEL_MASKS:
                p, t = _softmax_onehot_tile(x_row, t_row, offs_c, offs_s64, C, smask,
                                            ignore_index, stride_xc, stride_xs, stride_ts,
                                            HAS_IGNORE, APPROX_RCP, ACC)
            else:
                p, _ = _tile_probabilities(x_row, offs_c, offs_s64, C, smask, stride_xc,
                                           stride_xs, ACTIVATION, ONE_CHUNK, BLOCK_C, BLOCK_S,
                                           ACC)
                t, valid = _load_target(t_row, offs_c, offs_s64, C, smask, ignore_index,
                                        stride_tc, stride_ts, DENSE_TARGET, HAS_IGNORE, ACC)
                p = tl.where(valid, p, 0.0)
            if MIN_INTERSECTION:
                inter = tl.minimum(p, t, propagate_nan=tl.PropagateNan.ALL)
            else:
                inter = p * t
            if SQUARED:
                p = p * p
                t = t * t
            # one reduction of the three terms: separate sums let the compiler
            # lay the one-hot target out with every class in one thread (a
            # cross-lane sum per class and 2 registers per class held)
            # (full-tile accumulators, 3 registers per element, reduced once
            # after the loop were slower on the H100: 0.213 -> 0.404 ms at 21
            # classes, NCHW; the partials kept here are per thread-vector of
            # GROUP pixels)
            sum_i, sum_p, sum_t = tl.reduce(
                (tl.reshape(inter, [BLOCK_C, BLOCK_S // GROUP, GROUP]),
                 tl.reshape(p, [BLOCK_C, BLOCK_S // GROUP, GROUP]),
                 tl.reshape(t, [BLOCK_C, BLOCK_S // GROUP, GROUP])), 2, _add_triples)
            acc_i += sum_i
            acc_p += sum_p
            acc_t += sum_t
        acc_i, acc_p, acc_t = tl.reduce((acc_i, acc_p, acc_t), 1, _add_triples)
        cmask = offs_c < C
        tl.store(part_row + offs_c, acc_i, mask=cmask)
        tl.store(part_row + plane + offs_c, acc_p, mask=cmask)
        tl.store(part_row + 2 * plane + offs_c, acc_t, mask=cmask)


# --------------------------------------------------------------------------
# backward: d(sums)/d(logits)
# --------------------------------------------------------------------------
@triton.jit
def _grad_probabilities(p, t, valid, gi_row, gp_row, offs_c, C,
                        SQUARED: tl.constexpr, MIN_INTERSECTION: tl.constexpr):
    """dL/dp for every element: gi[c]*dI/dp + gp[c]*(1 or 2p), zero where
    masked. dI/dp is t, or for min(p, t) 0 above t, 1/2 at a tie, else 1 (a NaN
    p too), as autograd differentiates torch.minimum(p, t)."""
    # p is -inf in padded classes with ACTIVATION none: keep 0 * inf out
    g = _dl_dp(tl.where(valid, p, 0.0), t, gi_row, gp_row, offs_c, C, SQUARED, MIN_INTERSECTION)
    return tl.where(valid, g, 0.0)


@triton.jit
def _dl_dp(p, t, gi_row, gp_row, offs_c, C, SQUARED: tl.constexpr, MIN_INTERSECTION: tl.constexpr):
    """gi[c]*dI/dp + gp[c]*(1 or 2p) of every element, unmasked."""
    cmask = offs_c < C
    gi = tl.load(gi_row + offs_c, mask=cmask, other=0.0)
    gp = tl.load(gp_row + offs_c, mask=cmask, other=0.0)
    if MIN_INTERSECTION:
        d_intersection = tl.where(p > t, 0.0, tl.where(p == t, 0.5, 1.0))
    else:
        d_intersection = t
    if SQUARED:
        return gi[:, None] * d_intersection + gp[:, None] * 2.0 * p
    else:
        return gi[:, None] * d_intersection + gp[:, None]


@triton.jit
def _softmax_onehot_grad_tile(x_row, t_row, gi_row, gp_row, offs_c, offs_s64, C, smask,
                              ignore_index, stride_xc, stride_xs, stride_ts,
                              HAS_IGNORE: tl.constexpr, SQUARED: tl.constexpr,
                              MIN_INTERSECTION: tl.constexpr, APPROX_RCP: tl.constexpr,
                              ACC: tl.constexpr):
    """(p, dL/dp) of a tile holding every class of its pixels, for index
    targets: ``_softmax_onehot_tile``'s per-pixel masks, except that an
    ignored pixel keeps its probabilities (NaN logits give NaN there, as
    the reference's softmax backward does) and only dL/dp is zeroed."""
    raw, counts = _pixel_labels(t_row, offs_s64, smask, ignore_index, stride_ts, HAS_IGNORE)
    x = _load_scores_or_minus_inf(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
    e = _exp_minus(x, _exp_shift(tl.max(x, axis=0))[None, :])
    p = e * _reciprocal(tl.sum(e, axis=0), APPROX_RCP)[None, :]
    # the label of a pixel that does not count may name a class: its dL/dp is zeroed below
    t = (raw.to(tl.int64)[None, :] == offs_c[:, None]).to(ACC)
    g = _dl_dp(p, t, gi_row, gp_row, offs_c, C, SQUARED, MIN_INTERSECTION)
    return p, tl.where(counts[None, :], g, 0.0)


@triton.jit
def _store_grad_logits(g_row, slope, g, dot, offs_c, offs_s64, C, smask, stride_gc,
                       stride_gs, ACTIVATION: tl.constexpr):
    """dL/dx from dL/dp = g through the activation, with the slope from
    ``_probabilities`` (softmax: p * (g - dot), dot = sum_c g_c p_c over
    every class of the pixel; sigmoid: g * sigmoid'(x))."""
    if ACTIVATION == 2:
        gx = slope * (g - dot[None, :])
    elif ACTIVATION == 1:
        gx = g * slope
    else:
        gx = g
    ptrs = _tile_pointers(g_row, offs_c, offs_s64, stride_gc, stride_gs)
    tl.store(ptrs, gx.to(g_row.dtype.element_ty), mask=(offs_c < C)[:, None] & smask[None, :])


@triton.jit
def _chunk_grad(x_row, t_row, gi_row, gp_row, offs_c, offs_s64, C, smask, m, l, ignore_index,
                stride_xc, stride_xs, stride_tc, stride_ts, ACTIVATION: tl.constexpr,
                DENSE_TARGET: tl.constexpr, HAS_IGNORE: tl.constexpr, SQUARED: tl.constexpr,
                MIN_INTERSECTION: tl.constexpr, ACC: tl.constexpr):
    """(p, slope, dL/dp) of one class chunk (the slope as ``_probabilities``
    gives it), softmax from the statistics (m, l) of every class (unused by
    the other activations)."""
    x = _load_scores(x_row, offs_c, offs_s64, C, smask, stride_xc, stride_xs, ACC)
    t, valid = _load_target(t_row, offs_c, offs_s64, C, smask, ignore_index,
                            stride_tc, stride_ts, DENSE_TARGET, HAS_IGNORE, ACC)
    p, slope = _probabilities(x, m, l, ACTIVATION)
    return p, slope, _grad_probabilities(p, t, valid, gi_row, gp_row, offs_c, C, SQUARED,
                                         MIN_INTERSECTION)


@triton.jit
def _overlap_sums_bwd_kernel(
    x_ptr, t_ptr, gi_ptr, gp_ptr, gx_ptr,
    C, S, NUM_S_BLOCKS, ignore_index,
    stride_xn, stride_xc, stride_xs,
    stride_tn, stride_tc, stride_ts,
    stride_gn, stride_gc, stride_gs,
    ACTIVATION: tl.constexpr, DENSE_TARGET: tl.constexpr,
    HAS_IGNORE: tl.constexpr, SQUARED: tl.constexpr, MIN_INTERSECTION: tl.constexpr,
    ONE_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    APPROX_RCP: tl.constexpr, ACC: tl.constexpr,
):
    # One program per (sample, pixel block); the flat 1-D grid avoids the
    # 65535 limit of grid axes 1 and 2 for large volumes.
    pid = tl.program_id(0)
    pid_n = pid // NUM_S_BLOCKS
    pid_s = pid % NUM_S_BLOCKS
    x_row = x_ptr + pid_n.to(tl.int64) * stride_xn
    t_row = t_ptr + pid_n.to(tl.int64) * stride_tn
    g_row = gx_ptr + pid_n.to(tl.int64) * stride_gn
    gi_row = gi_ptr + pid_n.to(tl.int64) * C
    gp_row = gp_ptr + pid_n.to(tl.int64) * C
    offs_s64 = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s64 < S

    if ONE_CHUNK:
        # every class in one tile: the logits are read once, one exp each
        offs_c = tl.arange(0, BLOCK_C)
        if ACTIVATION == 2 and not DENSE_TARGET:
            p, g = _softmax_onehot_grad_tile(x_row, t_row, gi_row, gp_row, offs_c, offs_s64, C,
                                             smask, ignore_index, stride_xc, stride_xs,
                                             stride_ts, HAS_IGNORE, SQUARED, MIN_INTERSECTION,
                                             APPROX_RCP, ACC)
            slope = p
        else:
            p, slope = _tile_probabilities(x_row, offs_c, offs_s64, C, smask, stride_xc,
                                           stride_xs, ACTIVATION, ONE_CHUNK, BLOCK_C, BLOCK_S,
                                           ACC)
            t, valid = _load_target(t_row, offs_c, offs_s64, C, smask, ignore_index,
                                    stride_tc, stride_ts, DENSE_TARGET, HAS_IGNORE, ACC)
            g = _grad_probabilities(p, t, valid, gi_row, gp_row, offs_c, C, SQUARED,
                                    MIN_INTERSECTION)
        if ACTIVATION == 2:
            dot = tl.sum(g * p, axis=0)
        else:
            dot = tl.zeros([BLOCK_S], ACC)
        _store_grad_logits(g_row, slope, g, dot, offs_c, offs_s64, C, smask, stride_gc,
                           stride_gs, ACTIVATION)
    else:
        # class chunks: softmax's statistics and sum_c g_c p_c over all
        # classes, then the gradient: the logits are read twice (three times
        # for the min intersection, whose dL/dp needs p itself)
        if ACTIVATION == 2 and not MIN_INTERSECTION:
            m, l, dot = _softmax_stats_and_dot(x_row, t_row, gi_row, gp_row, C, offs_s64, smask,
                                               ignore_index, stride_xc, stride_xs, stride_tc,
                                               stride_ts, DENSE_TARGET, HAS_IGNORE, SQUARED,
                                               BLOCK_C, BLOCK_S, ACC)
        elif ACTIVATION == 2:
            m, l = _softmax_stats(x_row, C, offs_s64, smask, stride_xc, stride_xs,
                                  BLOCK_C, BLOCK_S, ACC)
            dot = tl.zeros([BLOCK_S], ACC)
            for c0 in range(0, C, BLOCK_C):
                p, _, g = _chunk_grad(x_row, t_row, gi_row, gp_row, c0 + tl.arange(0, BLOCK_C),
                                   offs_s64, C, smask, m, l, ignore_index, stride_xc, stride_xs,
                                   stride_tc, stride_ts, ACTIVATION, DENSE_TARGET, HAS_IGNORE,
                                   SQUARED, MIN_INTERSECTION, ACC)
                dot += tl.sum(g * p, axis=0)
        else:
            m = tl.zeros([BLOCK_S], ACC)
            l = tl.full([BLOCK_S], 1.0, ACC)
            dot = tl.zeros([BLOCK_S], ACC)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            _, slope, g = _chunk_grad(x_row, t_row, gi_row, gp_row, offs_c, offs_s64, C, smask,
                                      m, l, ignore_index, stride_xc, stride_xs, stride_tc,
                                      stride_ts, ACTIVATION, DENSE_TARGET, HAS_IGNORE, SQUARED,
                                      MIN_INTERSECTION, ACC)
            _store_grad_logits(g_row, slope, g, dot, offs_c, offs_s64, C, smask, stride_gc,
                               stride_gs, ACTIVATION)


# --------------------------------------------------------------------------
# Dice/Jaccard loss from the sums, and its gradient back to the sums
# --------------------------------------------------------------------------
# One program of a few warps: the sums are (3, N, C), a few KB, and each
# epilogue replaces a dozen small aten calls (the loss is host-bound: about
# 30 us of host per call on the H100 machine, benchmarks/results/
# nvidia_h100_80gb_hbm3/overlap_tiles_2026-11-27).
@triton.jit
def _class_weights(count_ptr, weight_ptr, offs_c, cmask, HAS_SELECTION: tl.constexpr,
                   HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr):
    """(multiplicity, weight) of classes ``offs_c``: how often ``classes``
    names each (1 for all without a selection; 0 for masked lanes) and its
    class weight (1 without weights)."""
    if HAS_SELECTION:
        count = tl.load(count_ptr + offs_c, mask=cmask, other=0.0).to(ACC)
    else:
        count = tl.where(cmask, 1.0, 0.0).to(ACC)
    if HAS_WEIGHTS:
        weight = tl.load(weight_ptr + offs_c, mask=cmask, other=0.0).to(ACC)
    else:
        weight = tl.full(offs_c.shape, 1.0, ACC)
    return count, weight


@triton.jit
def _score_terms(i, p, t, smooth, eps, JACCARD: tl.constexpr):
    """Tversky score (I + s) / max(D + s, eps), D = (P + T)/2 (Dice) or
    P + T - I (Jaccard); also returns D and the clamped denominator."""
    if JACCARD:
        den = p + t - i
    else:
        den = (p + t) * 0.5
    q = tl.maximum(den + smooth, eps, propagate_nan=tl.PropagateNan.ALL)
    return div(i + smooth, q), den, q


@triton.jit
def _class_loss(i, p, t, smooth, eps, JACCARD: tl.constexpr, LOG_LOSS: tl.constexpr,
                SKIP_EMPTY: tl.constexpr):
    score, den, q = _score_terms(i, p, t, smooth, eps, JACCARD)
    if LOG_LOSS:
        loss = -tl.log(tl.maximum(score, eps, propagate_nan=tl.PropagateNan.ALL))
    else:
        loss = 1.0 - score
    if SKIP_EMPTY:
        loss = loss * (t > 0).to(loss.dtype)   # a product, so NaN stays NaN as in torch
    return loss


@triton.jit
def _clamp_passes(value, bound, CLAMP_TIE: tl.constexpr):
    """Where clamp_min(value, bound) passes its gradient: above the bound,
    and at it when CLAMP_TIE (the torch in use decides, see
    reference.overlap.CLAMP_MIN_PASSES_TIE)."""
    if CLAMP_TIE:
        return value >= bound
    else:
        return value > bound


@triton.jit
def _class_loss_grads(dl, i, p, t, smooth, eps, JACCARD: tl.constexpr, LOG_LOSS: tl.constexpr,
                      SKIP_EMPTY: tl.constexpr, CLAMP_TIE: tl.constexpr):
    """(dI, dP) from dl = d(out)/d(loss), as autograd differentiates the
    composite."""
    score, den, q = _score_terms(i, p, t, smooth, eps, JACCARD)
    if SKIP_EMPTY:
        dl = dl * (t > 0).to(dl.dtype)
    if LOG_LOSS:
        dscore = tl.where(_clamp_passes(score, eps, CLAMP_TIE), div(-dl, tl.maximum(score, eps)),
                          0.0)
    else:
        dscore = -dl
    dnum = div(dscore, q)
    dden = tl.where(_clamp_passes(den + smooth, eps, CLAMP_TIE), -dscore * div(score, q), 0.0)
    if JACCARD:
        return dnum - dden, dden
    return dnum, dden * 0.5


@triton.jit
def _weight_total(count_ptr, weight_ptr, C, HAS_SELECTION: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                  BLOCK: tl.constexpr, ACC: tl.constexpr):
    """The selected classes' weights summed (their count without weights):
    with the rows, what 'mean' divides by."""
    total = tl.zeros([BLOCK], ACC)
    for c0 in range(0, C, BLOCK):
        offs_c = c0 + tl.arange(0, BLOCK)
        count, weight = _class_weights(count_ptr, weight_ptr, offs_c, offs_c < C, HAS_SELECTION,
                                       HAS_WEIGHTS, ACC)
        # a class left out counts nothing, whatever its weight (inf too)
        total += tl.where(count > 0, count * weight, 0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _load_sums(sums_ptr, offs, plane, mask):
    i = tl.load(sums_ptr + offs, mask=mask, other=0.0)
    p = tl.load(sums_ptr + plane + offs, mask=mask, other=0.0)
    t = tl.load(sums_ptr + 2 * plane + offs, mask=mask, other=0.0)
    return i, p, t


@triton.jit
def _batch_sums(sums_ptr, N, C, offs_c, cmask, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Sums of classes ``offs_c`` over the batch, n in order."""
    plane = N * C
    i = tl.zeros([BLOCK], ACC)
    p = tl.zeros([BLOCK], ACC)
    t = tl.zeros([BLOCK], ACC)
    for n in range(0, N):
        bi, bp, bt = _load_sums(sums_ptr, n * C + offs_c, plane, cmask)
        i += bi
        p += bp
        t += bt
    return i, p, t


@triton.jit
def _class_block(sums_ptr, count_ptr, weight_ptr, N, C, c0, HAS_SELECTION: tl.constexpr,
                 HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Classes [c0, c0 + BLOCK): offsets, mask, multiplicity, weight, and
    their sums over the batch."""
    offs_c = c0 + tl.arange(0, BLOCK)
    cmask = offs_c < C
    count, weight = _class_weights(count_ptr, weight_ptr, offs_c, cmask, HAS_SELECTION,
                                   HAS_WEIGHTS, ACC)
    i, p, t = _batch_sums(sums_ptr, N, C, offs_c, cmask, BLOCK, ACC)
    return offs_c, cmask, count, weight, i, p, t


@triton.jit
def _pair_block(sums_ptr, count_ptr, weight_ptr, N, C, e0, HAS_SELECTION: tl.constexpr,
                HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(sample, class) pairs [e0, e0 + BLOCK) of the flattened (N, C):
    offsets, mask, multiplicity and weight of their class, and their sums."""
    offs = e0 + tl.arange(0, BLOCK)
    emask = offs < N * C
    count, weight = _class_weights(count_ptr, weight_ptr, offs % C, emask, HAS_SELECTION,
                                   HAS_WEIGHTS, ACC)
    i, p, t = _load_sums(sums_ptr, offs, N * C, emask)
    return offs, emask, count, weight, i, p, t


@triton.jit
def _overlap_loss_kernel(
    sums_ptr, count_ptr, weight_ptr, loss_ptr,
    N, C, smooth_bits, eps_bits,
    JACCARD: tl.constexpr, LOG_LOSS: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    BATCH: tl.constexpr, MEAN: tl.constexpr, HAS_SELECTION: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    # sums: (3, N, C) contiguous; with BATCH the per-class loss is taken of
    # the sums over n, else each (n, c) has its own loss
    smooth = from_bits(smooth_bits, ACC)
    eps = from_bits(eps_bits, ACC)
    total = tl.zeros([BLOCK], ACC)
    if BATCH:
        for c0 in range(0, C, BLOCK):
            _, _, count, weight, i, p, t = _class_block(sums_ptr, count_ptr, weight_ptr, N, C,
                                                        c0, HAS_SELECTION, HAS_WEIGHTS, BLOCK,
                                                        ACC)
            loss = _class_loss(i, p, t, smooth, eps, JACCARD, LOG_LOSS, SKIP_EMPTY)
            # unselected classes (count 0) drop out even where their loss is NaN
            total += tl.where(count > 0, count * weight * loss, 0.0)
        rows = 1
    else:
        for e0 in range(0, N * C, BLOCK):
            _, _, count, weight, i, p, t = _pair_block(sums_ptr, count_ptr, weight_ptr, N, C,
                                                       e0, HAS_SELECTION, HAS_WEIGHTS, BLOCK,
                                                       ACC)
            loss = _class_loss(i, p, t, smooth, eps, JACCARD, LOG_LOSS, SKIP_EMPTY)
            total += tl.where(count > 0, count * weight * loss, 0.0)
        rows = N
    out = tl.sum(total, axis=0)
    if MEAN:
        out = div(out, _weight_total(count_ptr, weight_ptr, C, HAS_SELECTION, HAS_WEIGHTS, BLOCK,
                                     ACC) * rows)
    tl.store(loss_ptr, out)


@triton.jit
def _overlap_loss_bwd_kernel(
    grad_ptr, sums_ptr, count_ptr, weight_ptr, gsums_ptr,
    N, C, smooth_bits, eps_bits,
    JACCARD: tl.constexpr, LOG_LOSS: tl.constexpr, SKIP_EMPTY: tl.constexpr,
    BATCH: tl.constexpr, MEAN: tl.constexpr, HAS_SELECTION: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, CLAMP_TIE: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    # gsums: (2, N, C): d(loss)/d(intersection), d(loss)/d(prediction sum)
    smooth = from_bits(smooth_bits, ACC)
    eps = from_bits(eps_bits, ACC)
    plane = N * C
    coef = tl.load(grad_ptr).to(ACC)
    if MEAN:
        rows = 1 if BATCH else N
        coef = div(coef, _weight_total(count_ptr, weight_ptr, C, HAS_SELECTION, HAS_WEIGHTS,
                                       BLOCK, ACC) * rows)
    if BATCH:
        for c0 in range(0, C, BLOCK):
            offs_c, cmask, count, weight, i, p, t = _class_block(
                sums_ptr, count_ptr, weight_ptr, N, C, c0, HAS_SELECTION, HAS_WEIGHTS, BLOCK, ACC)
            # unselected classes get dl = 0 (also when the mean over no class
            # makes coef infinite), and from it what autograd gives (0 * NaN
            # where their sums are NaN)
            dl = tl.where(count > 0, coef * weight * count, 0.0)
            di, dp = _class_loss_grads(dl, i, p, t, smooth, eps, JACCARD, LOG_LOSS, SKIP_EMPTY,
                                       CLAMP_TIE)
            for n in range(0, N):
                tl.store(gsums_ptr + n * C + offs_c, di, mask=cmask)
                tl.store(gsums_ptr + plane + n * C + offs_c, dp, mask=cmask)
    else:
        for e0 in range(0, N * C, BLOCK):
            offs, emask, count, weight, i, p, t = _pair_block(
                sums_ptr, count_ptr, weight_ptr, N, C, e0, HAS_SELECTION, HAS_WEIGHTS, BLOCK, ACC)
            # unselected classes get dl = 0 (also when the mean over no class
            # makes coef infinite), and from it what autograd gives (0 * NaN
            # where their sums are NaN)
            dl = tl.where(count > 0, coef * weight * count, 0.0)
            di, dp = _class_loss_grads(dl, i, p, t, smooth, eps, JACCARD, LOG_LOSS, SKIP_EMPTY,
                                       CLAMP_TIE)
            tl.store(gsums_ptr + offs, di, mask=emask)
            tl.store(gsums_ptr + plane + offs, dp, mask=emask)


# --------------------------------------------------------------------------
# confusion matrix
# --------------------------------------------------------------------------
@triton.jit
def _argmax_classes(p_row, C, offs_s64, smask, stride_pc, stride_ps,
                    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_S] int64 argmax over the C classes, chunk by chunk, with
    torch.argmax's rule: NaN is the maximum (the first NaN wins), otherwise
    the first index of the maximum. (tl.argmax has no NaN rule.)"""
    best = tl.full([BLOCK_S], float("-inf"), ACC)
    label = tl.zeros([BLOCK_S], tl.int32)
    first_nan = tl.full([BLOCK_S], C, tl.int32)   # C: no NaN seen
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        x = _load_scores(p_row, offs_c, offs_s64, C, smask, stride_pc, stride_ps, ACC)
        is_nan = x != x
        first_nan = tl.minimum(first_nan, tl.min(tl.where(is_nan, offs_c[:, None], C), axis=0))
        x = tl.where(is_nan, float("-inf"), x)
        chunk_best = tl.max(x, axis=0)
        chunk_label = tl.min(tl.where(x == chunk_best[None, :], offs_c[:, None], C), axis=0)
        # strict: on a tie the earlier chunk keeps it
        label = tl.where(chunk_best > best, chunk_label, label)
        best = tl.maximum(best, chunk_best)
    return tl.where(first_nan < C, first_nan, label).to(tl.int64)


@triton.jit
def _block_pairs(pred_ptr, t_ptr, block, C, S, NUM_S_BLOCKS, ignore_index,
                 stride_pn, stride_pc, stride_ps, stride_tn, stride_ts,
                 PRED_IS_SCORES: tl.constexpr, HAS_IGNORE: tl.constexpr,
                 CHECK_LABELS: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    """(truth, label, valid, bad) of the BLOCK_S pixels of ``block`` (blocks
    are numbered sample by sample), int64 labels; ``valid``: the pair
    counts; ``bad`` (CHECK_LABELS, else 0): how many pixels have a target
    label outside [0, C) that is not ignored, or a predicted label outside
    [0, C)."""
    pid_n = block // NUM_S_BLOCKS
    pid_s = block % NUM_S_BLOCKS
    p_row = pred_ptr + pid_n.to(tl.int64) * stride_pn
    t_row = t_ptr + pid_n.to(tl.int64) * stride_tn
    offs_s64 = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = offs_s64 < S
    if PRED_IS_SCORES:
        label = _argmax_classes(p_row, C, offs_s64, smask, stride_pc, stride_ps,
                                BLOCK_C, BLOCK_S, ACC)
    else:
        # full width: a label of 2**32 + 1 is out of range, not class 1
        label = tl.load(p_row + offs_s64 * stride_ps, mask=smask, other=0).to(tl.int64)
    raw_truth = tl.load(t_row + offs_s64 * stride_ts, mask=smask, other=0)
    truth = raw_truth.to(tl.int64)
    valid = smask & (truth >= 0) & (truth < C) & (label >= 0) & (label < C)
    if HAS_IGNORE:
        valid = valid & ~_is_ignored(raw_truth, ignore_index)
    bad = 0
    if CHECK_LABELS:
        wrong = _out_of_range(raw_truth, smask, C, ignore_index, HAS_IGNORE)
        if not PRED_IS_SCORES:   # an argmax is always in range
            wrong = wrong | (smask & ((label < 0) | (label >= C)))
        bad = _count(wrong)
    return truth, label, valid, bad


@triton.jit
def _confusion_matrix_kernel(
    pred_ptr, t_ptr, cm_ptr, bad_ptr,
    C, S, NUM_S_BLOCKS, NUM_BLOCKS, ignore_index,
    stride_pn, stride_pc, stride_ps,
    stride_tn, stride_ts,
    PRED_IS_SCORES: tl.constexpr, HAS_IGNORE: tl.constexpr, CHECK_LABELS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, NUM_BINS: tl.constexpr,
    DIAG_BINS: tl.constexpr, ACC: tl.constexpr,
):
    # A persistent grid: program p takes pixel blocks p, p + P, p + 2P, ...
    # and keeps its histogram in registers across them, so the (C, C)
    # counters get one atomic per bin per program, not per block (H100,
    # 21 classes, one-warp tiles: 0.305 ms against 0.464 with one program
    # per block). Counts are integers, so the atomics give the same result
    # in any order: deterministic.
    # 64-bit: the last block + programs may pass int32
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    bad = 0   # CHECK_LABELS: the most bad labels in one block (flagged at the end)
    if NUM_BINS > 0:
        # small C: a histogram of every (target, prediction) pair; the last
        # bin takes the pixels that do not count
        counts = tl.zeros([NUM_BINS], tl.int32)
        for block in range(pid, NUM_BLOCKS, programs):
            truth, label, valid, block_bad = _block_pairs(
                pred_ptr, t_ptr, block, C, S, NUM_S_BLOCKS, ignore_index, stride_pn, stride_pc,
                stride_ps, stride_tn, stride_ts, PRED_IS_SCORES, HAS_IGNORE, CHECK_LABELS,
                BLOCK_C, BLOCK_S, ACC)
            bad = tl.maximum(bad, block_bad)
            bins = tl.where(valid, truth * C + label, NUM_BINS - 1).to(tl.int32)
            counts += tl.histogram(bins, NUM_BINS)
        offs_b = tl.arange(0, NUM_BINS)
        tl.atomic_add(cm_ptr + offs_b, counts.to(tl.int64),
                      mask=(offs_b < C * C) & (counts > 0), sem="relaxed")
    else:
        # many classes: the diagonal (the pixels predicted right, most of
        # them in a trained model, all piling onto C counters) through a
        # histogram, the mismatches, spread over C^2 - C counters, one
        # atomic each
        hits = tl.zeros([DIAG_BINS if DIAG_BINS > 0 else 1], tl.int32)
        ones = tl.full([BLOCK_S], 1, tl.int64)
        for block in range(pid, NUM_BLOCKS, programs):
            truth, label, valid, block_bad = _block_pairs(
                pred_ptr, t_ptr, block, C, S, NUM_S_BLOCKS, ignore_index, stride_pn, stride_pc,
                stride_ps, stride_tn, stride_ts, PRED_IS_SCORES, HAS_IGNORE, CHECK_LABELS,
                BLOCK_C, BLOCK_S, ACC)
            bad = tl.maximum(bad, block_bad)
            if DIAG_BINS > 0:
                hit = valid & (truth == label)
                hits += tl.histogram(tl.where(hit, truth, DIAG_BINS - 1).to(tl.int32),
                                     DIAG_BINS)
                valid = valid & ~hit
            tl.atomic_add(cm_ptr + truth * C + label, ones, mask=valid, sem="relaxed")
        if DIAG_BINS > 0:
            offs_d = tl.arange(0, DIAG_BINS)
            tl.atomic_add(cm_ptr + offs_d * (C + 1), hits.to(tl.int64),
                          mask=(offs_d < C) & (hits > 0), sem="relaxed")
    if CHECK_LABELS:
        _flag_bad_labels(bad_ptr, bad)


# --------------------------------------------------------------------------
# IoU / Dice scores of a confusion matrix
# --------------------------------------------------------------------------
AVERAGES = {"micro": 0, "macro": 1, "weighted": 2, "none": 3}   # the kernel's AVERAGE
_MICRO, _MACRO, _WEIGHTED, _PER_CLASS = (tl.constexpr(code) for code in AVERAGES.values())


@triton.jit
def _class_totals(cm_ptr, C, offs_c, cmask, stride_r, stride_c,
                  BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """float64 (row sums, column sums) of the classes ``offs_c`` (int64)."""
    rows = tl.zeros([BLOCK_C], tl.float64)
    cols = tl.zeros([BLOCK_C], tl.float64)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k < C
        row_tile = tl.load(cm_ptr + offs_c[:, None] * stride_r + offs_k[None, :] * stride_c,
                           mask=cmask[:, None] & kmask[None, :], other=0)
        rows += tl.sum(row_tile.to(tl.float64), axis=1)
        col_tile = tl.load(cm_ptr + offs_k[:, None] * stride_r + offs_c[None, :] * stride_c,
                           mask=kmask[:, None] & cmask[None, :], other=0)
        cols += tl.sum(col_tile.to(tl.float64), axis=0)
    return rows, cols


@triton.jit
def _confusion_score_kernel(
    cm_ptr, out_ptr, C, dropped, stride_r, stride_c,
    DICE: tl.constexpr, AVERAGE: tl.constexpr, ZERO_DIVISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: the matrix is small next to the pixels it counts, and one
    # launch replaces the score's twenty aten ops. float64, in
    # reference.confusion_score's order of operations. Padded classes load
    # as zeros: denominator 0, so never present, and they add nothing.
    total_num = tl.zeros([BLOCK_C], tl.float64)   # what the average sums
    total_den = tl.zeros([BLOCK_C], tl.float64)   # and what it divides by
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = offs_c < C
        rows, cols = _class_totals(cm_ptr, C, offs_c, cmask, stride_r, stride_c, BLOCK_C, BLOCK_K)
        tp = tl.load(cm_ptr + offs_c * stride_r + offs_c * stride_c, mask=cmask,
                     other=0).to(tl.float64)
        fp = cols - tp
        fn = rows - tp
        if DICE:
            num = 2 * tp
            den = 2 * tp + fp + fn
        else:
            num = tp
            den = tp + fp + fn
        keep = offs_c != dropped   # dropped: -1 for none
        if AVERAGE == _MICRO:
            total_num += num
            total_den += tl.where(keep, den, 0.0)
        else:
            present = (den > 0) | (den != den)   # NaN counts: NaN, not absent
            ratio = tl.where(present, num / den, ZERO_DIVISION)
            if AVERAGE == _PER_CLASS:
                tl.store(out_ptr + offs_c, ratio, mask=cmask)
            else:
                if AVERAGE == _MACRO:
                    weight = tl.where(present & keep, 1.0, 0.0)
                else:
                    weight = tl.where(present, tp + fn, 0.0)
                total_num += tl.where(weight != 0, ratio * weight, 0.0)
                total_den += weight
    num = tl.sum(total_num, axis=0)
    den = tl.sum(total_den, axis=0)
    if AVERAGE == _MICRO:
        tl.store(out_ptr, tl.where((den > 0) | (den != den), num / den, ZERO_DIVISION))
    elif AVERAGE != _PER_CLASS:
        tl.store(out_ptr, num / den)


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
# grid axis 0 holds up to 2^31 - 1 programs (CUDA's limit; program ids are int32)
MAX_PROGRAMS = 2**31 - 1


def max_programs_ok(programs: int) -> bool:
    return programs <= MAX_PROGRAMS


def check_programs(name: str, tensor: torch.Tensor, programs: int) -> None:
    """Raise before any launch or allocation when a flat grid of ``programs``
    programs (one per sample and pixel block) would pass grid axis 0."""
    if not max_programs_ok(programs):
        raise ArgumentError(
            f"{name} of shape {tuple(tensor.shape)} needs {programs} programs, past the "
            f"2^31 - 1 a kernel grid allows; split the batch")


def ignore_value(ignore_index: int | None, dtype: torch.dtype) -> int:
    """The ignore_index argument the kernels compare with: torch's
    ``target != ignore_index`` converts the scalar to the target's dtype,
    which for integer dtypes wraps it into their range (-1 is 255 for
    uint8). Float targets get the int itself (the kernel rounds it)."""
    if ignore_index is None:
        return 0
    if dtype.is_floating_point:
        return ignore_index
    bits = torch.iinfo(dtype).bits
    low = torch.iinfo(dtype).min
    return (ignore_index - low) % (1 << bits) + low


def _tile(C: int, block_c: int | None, block_s: int | None,
          num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_S, num_warps): all classes of a pixel in one tile up to
    256 classes (chunked beyond). Up to 64 classes, 32 elements per thread
    on one warp per program; beyond, 2048 elements on 8 warps, at least 16
    pixels (150 classes: 256 x 16; one warp there would hold 128 elements
    per thread, 4 warps spilled in the fp32 NCHW forward).

    One warp keeps the reductions over a pixel's classes (softmax's max and
    sum, the gradient's dot, the argmax) inside the warp: with 8 warps per
    2048-element tile, NCHW tiles spread the classes over the warps and each
    reduction went through shared memory with barriers. On the H100
    (benchmarks/results/nvidia_h100_80gb_hbm3/overlap_tiles_2026-11-27,
    bf16, kernels alone, 16x21x512^2 NCHW) the forward went from 0.834 to
    0.213 ms, the backward from 1.100 to 0.200 ms (65% of copy bandwidth),
    the confusion matrix from 1.996 to 0.305 ms; channels_last forward
    0.647 -> 0.288, backward 0.484 -> 0.384 ms. The one slower case was
    the channels_last backward at 4 classes (0.055 -> 0.071 ms)."""
    BLOCK_C = block_c or block_size(C, 256)
    if BLOCK_C <= 64:
        return BLOCK_C, block_s or 1024 // BLOCK_C, num_warps or 1
    return BLOCK_C, block_s or max(16, 2048 // BLOCK_C), num_warps or 8


def _grid_programs(device: torch.device, num_warps: int) -> int:
    """Programs of a persistent grid: 32 warps per SM (4 programs of 8
    warps, 32 of 1)."""
    return target_programs(device) * max(1, 8 // num_warps)


# the most bins of the per-program histogram (tl.histogram) of the confusion
# matrix, and the most pixels one program may count in it (int32 counts)
_MAX_BINS = 2048
HISTOGRAM_PIXELS = 2**31 - 1


def _forward_pixel_masks(activation: str, dense: bool, C: int, block_c: int,
                         num_warps: int) -> bool:
    """Whether the forward takes ``_softmax_onehot_tile``: softmax over index
    targets with every class in one tile, on the one-warp tiles. The 8-warp
    tiles (past 64 classes) keep the generic path: there the per-pixel
    masks cost registers (150 classes, sm_90: 53 -> 80 registers under
    triton 3.8, 40 -> 76 under 3.6: 4 -> 3 and 6 -> 3 CTAs) for some 11%
    fewer instructions; occupancy kept, the trade unmeasured."""
    return activation == "softmax" and not dense and C <= block_c and num_warps == 1


def _pixel_group(x: torch.Tensor, block_s: int, block_c: int) -> int:
    """Pixels the forward sums in registers before its tile's partial sums:
    where pixels are contiguous (NCHW), one thread's vector of them (16
    bytes), so each step adds within threads and the sums cross lanes once
    per class chunk; otherwise (channels_last: a thread holds classes, the
    pixels lie across lanes) the whole tile, reduced each step, as partial
    sums per pixel would hold 3 registers per element of the tile (float64
    spilled with 2 pixels). One class (binary losses): the whole tile too,
    as triton 3.8 crashes (SIGSEGV in make_llir, sm_90) compiling the
    [1, BLOCK_S / GROUP, GROUP] reduction for fp32 and fp16 scores."""
    if x.stride(2) != 1 or x.dtype == torch.float64 or block_c == 1:
        return block_s   # float64: 6 registers an element
    return min(block_s, 16 // x.element_size())


def sums_dtype(input: torch.Tensor) -> torch.dtype:
    return accumulation_dtype(input.dtype)


def _as_ncs(input: torch.Tensor, target: torch.Tensor):
    """(N, C, S) views of input and target; an index target becomes (N, 1, S)."""
    x = flatten_trailing(input, 2)
    dense = target.dim() == input.dim()
    t = flatten_trailing(target, 2) if dense else flatten_trailing(target, 1).unsqueeze(1)
    return x, t, dense


def overlap_sums_forward(input, target, activation: str, ignore_index: int | None,
                         squared: bool, min_intersection: bool = False, block_c: int | None = None,
                         block_s: int | None = None, num_warps: int | None = None,
                         programs: int | None = None,
                         bad_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Returns [3, N, C]: intersection, prediction sum, target sum, in float32
    (float64 for float64 input).

    input: (N, C, *spatial) float. target: (N, *spatial) integer class ids or
    (N, C, *spatial) dense masks. ``block_c``/``block_s`` override the tile
    (tests use them to force chunking and several loop iterations).
    ``bad_labels``: a zeroed int32 tensor for index targets, set to 1 when a
    label lies outside [0, C) and is not ``ignore_index``.
    """
    N, C = input.shape[:2]
    x, t, dense = _as_ncs(input, target)
    S = x.shape[2]
    if N == 0 or C == 0 or S == 0:
        return torch.zeros((3, N, C), device=input.device, dtype=sums_dtype(input))
    BLOCK_C, BLOCK_S, num_warps = _tile(C, block_c, block_s, num_warps)
    s_blocks = cdiv(S, BLOCK_S)
    check_programs("input", input, N)
    programs = programs or _grid_programs(input.device, num_warps)
    programs_per_sample = max(1, min(s_blocks, cdiv(programs, N)))
    s_per_prog = cdiv(s_blocks, programs_per_sample) * BLOCK_S
    P = cdiv(S, s_per_prog)
    part = empty((3, N, P, C), device=input.device, dtype=sums_dtype(input))
    _overlap_sums_fwd_kernel[(N, P)](
        x, t, part, part if bad_labels is None else bad_labels,
        C, S, s_per_prog, ignore_value(ignore_index, target.dtype),
        x.stride(0), x.stride(1), x.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        ACTIVATION=ACTIVATIONS[activation], DENSE_TARGET=dense,
        HAS_IGNORE=ignore_index is not None, SQUARED=squared,
        MIN_INTERSECTION=min_intersection, CHECK_LABELS=bad_labels is not None,
        LABEL_BLOCK=128 * num_warps, ONE_CHUNK=C <= BLOCK_C, BLOCK_C=BLOCK_C,
        BLOCK_S=BLOCK_S, GROUP=_pixel_group(x, BLOCK_S, BLOCK_C),
        PIXEL_MASKS=_forward_pixel_masks(activation, dense, C, BLOCK_C, num_warps),
        APPROX_RCP=input.device.type == "cuda", ACC=tl_accumulation(input.dtype),
        num_warps=num_warps,
    )
    return part.sum(dim=2)


def overlap_sums_backward(grad_intersection, grad_pred_sum, input, target,
                          activation: str, ignore_index: int | None, squared: bool,
                          min_intersection: bool = False, block_c: int | None = None,
                          block_s: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Gradient of the sums w.r.t. ``input`` (same shape, dtype and memory
    format). grad_intersection, grad_pred_sum: (N, C) contiguous, in
    ``sums_dtype(input)``."""
    N, C = input.shape[:2]
    x, t, dense = _as_ncs(input, target)
    S = x.shape[2]
    BLOCK_C, BLOCK_S, num_warps = _tile(C, block_c, block_s, num_warps)
    s_blocks = cdiv(S, BLOCK_S)
    check_programs("input", input, N * s_blocks)
    grad = empty_like(x)
    if grad.numel() == 0:
        return grad.view(input.shape)
    _overlap_sums_bwd_kernel[(N * s_blocks,)](
        x, t, grad_intersection, grad_pred_sum, grad,
        C, S, s_blocks, ignore_value(ignore_index, target.dtype),
        x.stride(0), x.stride(1), x.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        grad.stride(0), grad.stride(1), grad.stride(2),
        ACTIVATION=ACTIVATIONS[activation], DENSE_TARGET=dense,
        HAS_IGNORE=ignore_index is not None, SQUARED=squared,
        MIN_INTERSECTION=min_intersection, ONE_CHUNK=C <= BLOCK_C, BLOCK_C=BLOCK_C,
        BLOCK_S=BLOCK_S, APPROX_RCP=input.device.type == "cuda",
        ACC=tl_accumulation(input.dtype), num_warps=num_warps,
    )
    return grad.view(input.shape)


def _loss_launch_args(sums, counts, weights, kind: str, smooth: float, eps: float,
                      log_loss: bool, skip_empty: bool, batch: bool, mean: bool):
    """Arguments shared by the two loss epilogue kernels after their pointers."""
    N, C = sums.shape[1:]
    pointers = (sums if counts is None else counts, sums if weights is None else weights)
    flags = dict(JACCARD=kind == "jaccard", LOG_LOSS=log_loss, SKIP_EMPTY=skip_empty,
                 BATCH=batch, MEAN=mean, HAS_SELECTION=counts is not None,
                 HAS_WEIGHTS=weights is not None, BLOCK=_LOSS_BLOCK,
                 ACC=tl_accumulation(sums.dtype), num_warps=4)
    sizes = (N, C, scalar_bits(smooth, sums.dtype), scalar_bits(eps, sums.dtype))
    return pointers, sizes, flags


# one program of 4 warps, 4 elements per thread per step
_LOSS_BLOCK = 512


def overlap_loss_forward(sums, counts, weights, kind: str, smooth: float, eps: float,
                         log_loss: bool, skip_empty: bool, batch: bool,
                         mean: bool) -> torch.Tensor:
    """The reduced Dice (``kind='dice'``) or Jaccard loss of ``sums`` (3, N,
    C) contiguous, as a 0-dim tensor of its dtype: per class (``batch``: of
    the sums over the batch) or per (sample, class), weighted and summed,
    divided by the weights' total for ``mean``. ``counts``: (C,) how often
    each class is selected (None: each once); ``weights``: (C,) class
    weights (None: all 1); both contiguous in the sums' dtype."""
    pointers, sizes, flags = _loss_launch_args(sums, counts, weights, kind, smooth, eps,
                                               log_loss, skip_empty, batch, mean)
    loss = empty((), device=sums.device, dtype=sums.dtype)
    _overlap_loss_kernel[(1,)](sums, *pointers, loss, *sizes, **flags)
    return loss


def overlap_loss_backward(grad, sums, counts, weights, kind: str, smooth: float, eps: float,
                          log_loss: bool, skip_empty: bool, batch: bool, mean: bool,
                          clamp_passes_tie: bool) -> torch.Tensor:
    """(2, N, C): the gradient of ``overlap_loss_forward`` with respect to the
    intersection and prediction sums (the target sum takes none), given
    ``grad``, the loss's 0-dim upstream gradient. ``clamp_passes_tie``:
    whether the eps clamps pass the gradient at their bound, as the torch in
    use does (reference.overlap.CLAMP_MIN_PASSES_TIE)."""
    pointers, sizes, flags = _loss_launch_args(sums, counts, weights, kind, smooth, eps,
                                               log_loss, skip_empty, batch, mean)
    grad_sums = empty((2, *sums.shape[1:]), device=sums.device, dtype=sums.dtype)
    _overlap_loss_bwd_kernel[(1,)](grad, sums, *pointers, grad_sums, *sizes,
                                   CLAMP_TIE=clamp_passes_tie, **flags)
    return grad_sums


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None,
                     block_c: int | None = None, block_s: int | None = None,
                     num_warps: int | None = None, programs: int | None = None,
                     bad_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = target, cols = prediction.

    pred: (N, *spatial) labels or (N, C, *spatial) scores (argmax is fused).
    target: (N, *spatial) labels. Pairs with a label outside [0, C) or a target
    equal to ``ignore_index`` are not counted. ``bad_labels``: a zeroed int32
    tensor, set to 1 when such a label (not ignored) occurs.
    """
    C = num_classes
    scores = pred.dim() == target.dim() + 1
    p = flatten_trailing(pred, 2) if scores else flatten_trailing(pred, 1).unsqueeze(1)
    t = flatten_trailing(target, 1)
    N, S = t.shape
    if N == 0 or S == 0 or C == 0:
        return torch.zeros((C, C), device=target.device, dtype=torch.int64)
    if scores:
        BLOCK_C, BLOCK_S, num_warps = _tile(C, block_c, block_s, num_warps)
    else:
        BLOCK_C, BLOCK_S, num_warps = 1, block_s or 1024, num_warps or 4
    # a per-program histogram of every (target, prediction) pair up to 45
    # classes; beyond, of the diagonal only (up to 2047 classes); the last
    # bin takes the pixels that do not count
    num_bins = next_pow2(C * C + 1)
    diag_bins = next_pow2(C + 1)
    s_blocks = cdiv(S, BLOCK_S)
    blocks = N * s_blocks
    check_programs("target", target, blocks)
    # the persistent grid: a few waves, and enough programs that none counts
    # more pixels than its int32 histogram holds (programs take blocks in
    # turn, so one takes at most cdiv(blocks, programs) of them)
    programs = programs or _grid_programs(target.device, num_warps)
    programs = min(blocks, max(programs, cdiv(blocks, max(1, HISTOGRAM_PIXELS // BLOCK_S))))
    cm = torch.zeros((C, C), device=target.device, dtype=torch.int64)
    _confusion_matrix_kernel[(programs,)](
        p, t, cm, cm if bad_labels is None else bad_labels,
        C, S, s_blocks, blocks, ignore_value(ignore_index, target.dtype),
        p.stride(0), p.stride(1), p.stride(2),
        t.stride(0), t.stride(1),
        PRED_IS_SCORES=scores, HAS_IGNORE=ignore_index is not None,
        CHECK_LABELS=bad_labels is not None, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S,
        NUM_BINS=num_bins if num_bins <= _MAX_BINS else 0,
        DIAG_BINS=diag_bins if num_bins > _MAX_BINS and diag_bins <= _MAX_BINS else 0,
        ACC=tl_accumulation(pred.dtype), num_warps=num_warps,
    )
    return cm


def confusion_score(confusion: torch.Tensor, dice: bool, average: str,
                    dropped: int | None, zero_division: float,
                    block_c: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``reference.confusion_score`` in one launch: float64, 0-dim (``(C,)``
    for ``average='none'``). confusion: (C, C), any strides, an integer or
    floating dtype. zero_division: 0.0, 1.0 or math.nan (a constexpr).
    ``block_c``/``block_k`` override the tile (tests force several class
    blocks with them)."""
    C = confusion.shape[0]
    out = empty((C,) if average == "none" else (), device=confusion.device,
                dtype=torch.float64)
    # one NaN object: the JIT's cache key holds the constexpr, and NaN
    # compares (and hashes) by identity; a fresh NaN per call (the custom op
    # passes a new float) would add a cache entry per call
    zero_division = math.nan if math.isnan(zero_division) else zero_division
    BLOCK_C = block_c or block_size(C, 256)
    BLOCK_K = block_k or block_size(C, max(1, 2048 // BLOCK_C))
    _confusion_score_kernel[(1,)](
        confusion, out, C, -1 if dropped is None else dropped,
        confusion.stride(0), confusion.stride(1),
        DICE=dice, AVERAGE=AVERAGES[average], ZERO_DIVISION=zero_division,
        BLOCK_C=BLOCK_C, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out
