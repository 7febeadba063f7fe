"""Box ops: pairwise IoU, box decoding, clipping, and segmented NMS.

Kernels:

* ``_box_iou_kernel``: one program per (BLOCK_M x BLOCK_N) tile of the IoU
  matrix, torchvision's ``box_iou`` formula (NaN propagates as torch.max).
* ``_decode_kernel``: one program per BLOCK rows x BLOCK_K classes of
  ``rel_codes (N, 4K)``; BoxCoder.decode_single's arithmetic, optionally
  clipped to the image in the same pass.
* ``_clip_kernel``: elementwise clamp of the x (even) and y (odd) columns.
* NMS, two launches for any number of segments (images x classes/levels):
  the boxes are sorted on the host side of the launch (device sorts, no
  sync) by (segment, -score, index), so each segment is a contiguous run
  ``[seg_start, seg_end)``.

  - The bitmask is stored per segment: each row (sorted box) of a segment
    of n_s boxes holds that segment's ``ceil(n_s / 64)`` 64-bit words, the
    segments' rows one after another, so the buffer holds
    sum_s n_s * ceil(n_s / 64) words, not N * ceil(N / 64) (~1 GB for 90 000
    boxes in 90 classes). Row offsets are an int64 cumulative sum on the
    device (``bitmask_layout``). The exact total needs a host sync, so a launch
    is sized without one (``bitmask_size``): for segments of up to
    ``GUESS_SEGMENT`` boxes (at most 32 words per box), exactly for a
    single segment. Segments that do not fit are skipped, and the caller,
    which reads the needed size with the result counts (its one sync),
    launches again sized exactly; see segops/ops/boxes.py.
  - ``_nms_mask_kernel``: program (row tile, column word w) writes, for each
    row i of its tile, the word w of row i, whose bit t says "box i
    suppresses box seg_start(i) + 64 w + t" (IoU > threshold, column after
    i, same segment). A program whose word lies past every row's segment,
    or wholly before the rows, exits at once: only tile pairs within a
    segment do IoU work. No N x N float matrix exists.
  - ``_nms_scan_kernel``: program p scans every segment that starts in rows
    [64 p, 64 p + 64), 64 rows at a time: the block's own words (the
    diagonal) are resolved in registers, one row per step, then the words of
    the kept rows are OR-ed into the segment's ``removed`` words for the
    later blocks (vectorised). Segments run in parallel, one program each.

The IoU used by NMS is torchvision's CPU kernel's, operation for operation
(``std::max``/``std::min`` semantics, so a NaN coordinate gives NaN area and
NaN IoU, which never exceeds the threshold), computed in float32 (float64
for float64 boxes); the threshold is compared exactly as torchvision's
double comparison does (see ``_threshold_bits``).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ._layout import (
    cdiv,
    check_grid,
    double_bits,
    empty,
    float_bits,
    next_pow2,
    scalar_bits,
    tl_accumulation,
)
from .._checks import accumulation_dtype
from ._math import div, from_bits

WORD = 64           # bits per mask word (columns per column tile)
NMS_BLOCK_M = 64    # rows per mask program
NMS_CHUNK = 8       # columns per step of a mask program
SCAN_BLOCK_W = 16   # later words OR-ed at a time by the scan
IOU_BLOCK = 32      # box_iou tile
GUESS_SEGMENT = 2048  # boxes per segment a launch sizes its bitmask for without a sync
ELEM_BLOCK = 256    # clip / decode rows per program


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------
@triton.jit
def _tv_max(a, b):
    """std::max(a, b) = a < b ? b : a (a NaN b gives a)."""
    return tl.where(a < b, b, a)


@triton.jit
def _tv_min(a, b):
    """std::min(a, b) = b < a ? b : a (a NaN b gives a)."""
    return tl.where(b < a, b, a)


@triton.jit
def _nan_max(a, b):
    """torch.max(a, b): NaN if either is NaN."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _nan_min(a, b):
    """torch.min(a, b): NaN if either is NaN."""
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _or(a, b):
    return a | b


def _threshold_bits(threshold: float, dtype: torch.dtype) -> int:
    """The bit pattern of the threshold the kernel compares IoUs with, so
    that ``iou > t`` in the kernel's dtype equals torchvision's comparison of
    the IoU with the double ``t``: float64 as is; for float32 the largest
    float32 <= t (an fp32 IoU exceeds t exactly when it exceeds that)."""
    if dtype == torch.float64:
        return double_bits(threshold)
    # an IoU is NaN or in [0, 1]: every threshold past +-2 (1e300 too, which
    # float32 cannot hold) compares as +-2 does
    threshold = min(max(threshold, -2.0), 2.0)
    t32 = struct.unpack("<f", struct.pack("<f", threshold))[0]
    if t32 > threshold:
        t32 = float(torch.nextafter(torch.tensor(t32, dtype=torch.float32),
                                    torch.tensor(-math.inf, dtype=torch.float32)))
    return float_bits(t32)


# --------------------------------------------------------------------------
# box_iou
# --------------------------------------------------------------------------
@triton.jit
def _box_iou_kernel(a_ptr, b_ptr, out_ptr, N, M, sa0, sa1, sb0, sb1,
                    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rows = pm.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < N
    cm = cols < M
    ra = a_ptr + rows * sa0
    cb = b_ptr + cols * sb0
    ax1 = tl.load(ra, mask=rm, other=0).to(ACC)
    ay1 = tl.load(ra + sa1, mask=rm, other=0).to(ACC)
    ax2 = tl.load(ra + 2 * sa1, mask=rm, other=0).to(ACC)
    ay2 = tl.load(ra + 3 * sa1, mask=rm, other=0).to(ACC)
    bx1 = tl.load(cb, mask=cm, other=0).to(ACC)
    by1 = tl.load(cb + sb1, mask=cm, other=0).to(ACC)
    bx2 = tl.load(cb + 2 * sb1, mask=cm, other=0).to(ACC)
    by2 = tl.load(cb + 3 * sb1, mask=cm, other=0).to(ACC)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = _nan_min(ax2[:, None], bx2[None, :]) - _nan_max(ax1[:, None], bx1[None, :])
    h = _nan_min(ay2[:, None], by2[None, :]) - _nan_max(ay1[:, None], by1[None, :])
    w = tl.where(w < 0, 0.0, w)  # clamp(min=0), NaN kept
    h = tl.where(h < 0, 0.0, h)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    iou = div(inter, union)
    offs = rows[:, None] * M + cols[None, :]
    tl.store(out_ptr + offs, iou.to(out_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])


def box_iou(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(N, M) IoU of a (N, 4) and b (M, 4), computed in float32 (float64 for
    float64 boxes) and written as ``out_dtype``."""
    N, M = a.shape[0], b.shape[0]
    out = empty(N, M, dtype=out_dtype, device=a.device)
    if N == 0 or M == 0:
        return out
    acc = tl_accumulation(torch.promote_types(a.dtype, b.dtype))
    grid = (cdiv(N, IOU_BLOCK), cdiv(M, IOU_BLOCK))
    check_grid(grid)
    _box_iou_kernel[grid](a, b, out, N, M, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                          ACC=acc, BLOCK_M=IOU_BLOCK, BLOCK_N=IOU_BLOCK)
    return out


# --------------------------------------------------------------------------
# clip_boxes_to_image and decode_boxes
# --------------------------------------------------------------------------
@triton.jit
def _clip(v, limit):
    """Tensor.clamp(min=0, max=limit): NaN stays NaN."""
    v = tl.where(v < 0, 0.0, v)
    return tl.where(v > limit, limit, v)


@triton.jit
def _clip_kernel(in_ptr, out_ptr, R, C, s0, s1, height, width,
                 ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(R, C) boxes, C even: x at even columns, y at odd ones."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    m = (rows[:, None] < R) & (cols[None, :] < C)
    v = tl.load(in_ptr + rows[:, None] * s0 + cols[None, :] * s1, mask=m, other=0).to(ACC)
    limit = tl.where((cols % 2) == 0, from_bits(width, ACC), from_bits(height, ACC))
    v = _clip(v, limit[None, :])
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], v.to(out_ptr.dtype.element_ty), mask=m)


def clip_boxes(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """boxes (..., C) with C even, clipped; a contiguous tensor of boxes' dtype."""
    shape = boxes.shape
    if boxes.numel() == 0:  # (reshape(-1, 0) is ambiguous)
        return torch.empty(shape, dtype=boxes.dtype, device=boxes.device)
    flat = boxes.reshape(-1, shape[-1]) if boxes.dim() != 2 else boxes
    R, C = flat.shape
    out = empty(R, C, dtype=boxes.dtype, device=boxes.device)
    if R and C:
        block_c = next_pow2(C)
        block_r = max(1, ELEM_BLOCK // block_c)
        acc = tl_accumulation(boxes.dtype)
        grid = (cdiv(R, block_r),)
        check_grid(grid)
        dt = accumulation_dtype(boxes.dtype)
        _clip_kernel[grid](flat, out, R, C, flat.stride(0), flat.stride(1),
                           scalar_bits(height, dt), scalar_bits(width, dt), ACC=acc,
                           BLOCK_R=block_r, BLOCK_C=block_c)
    return out.view(shape)


@triton.jit
def _decode_kernel(codes_ptr, boxes_ptr, out_ptr, N, K, sc0, sc1, sb0, sb1,
                   wx, wy, ww, wh, clip, height, width,
                   CLIP_TO_IMAGE: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    rows = pn.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = rows < N
    m = rm[:, None] & (ks[None, :] < K)
    rb = boxes_ptr + rows * sb0
    x1 = tl.load(rb, mask=rm, other=0).to(ACC)
    y1 = tl.load(rb + sb1, mask=rm, other=0).to(ACC)
    x2 = tl.load(rb + 2 * sb1, mask=rm, other=0).to(ACC)
    y2 = tl.load(rb + 3 * sb1, mask=rm, other=0).to(ACC)
    widths = x2 - x1
    heights = y2 - y1
    ctr_x = x1 + 0.5 * widths
    ctr_y = y1 + 0.5 * heights
    c = codes_ptr + rows[:, None] * sc0 + (ks[None, :] * 4) * sc1
    dx = tl.load(c, mask=m, other=0).to(ACC) / from_bits(wx, ACC)
    dy = tl.load(c + sc1, mask=m, other=0).to(ACC) / from_bits(wy, ACC)
    dw = tl.load(c + 2 * sc1, mask=m, other=0).to(ACC) / from_bits(ww, ACC)
    dh = tl.load(c + 3 * sc1, mask=m, other=0).to(ACC) / from_bits(wh, ACC)
    clip = from_bits(clip, ACC)
    dw = tl.where(dw > clip, clip, dw)  # clamp(max=clip), NaN kept
    dh = tl.where(dh > clip, clip, dh)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = tl.exp(dw) * widths[:, None]
    pred_h = tl.exp(dh) * heights[:, None]
    half_w = 0.5 * pred_w
    half_h = 0.5 * pred_h
    o1 = pred_ctr_x - half_w
    o2 = pred_ctr_y - half_h
    o3 = pred_ctr_x + half_w
    o4 = pred_ctr_y + half_h
    if CLIP_TO_IMAGE:
        w_lim = from_bits(width, ACC)
        h_lim = from_bits(height, ACC)
        o1 = _clip(o1, w_lim)
        o2 = _clip(o2, h_lim)
        o3 = _clip(o3, w_lim)
        o4 = _clip(o4, h_lim)
    o = out_ptr + rows[:, None] * (4 * K) + ks[None, :] * 4
    ty = out_ptr.dtype.element_ty
    tl.store(o, o1.to(ty), mask=m)
    tl.store(o + 1, o2.to(ty), mask=m)
    tl.store(o + 2, o3.to(ty), mask=m)
    tl.store(o + 3, o4.to(ty), mask=m)


def decode_boxes(rel_codes: torch.Tensor, boxes: torch.Tensor, weights, clip: float,
                 image_size=None) -> torch.Tensor:
    """rel_codes (N, 4K) against boxes (N, 4): (N, 4K) in rel_codes' dtype,
    computed in float32 (float64 for float64 codes)."""
    N, C = rel_codes.shape
    K = C // 4
    out = empty(N, C, dtype=rel_codes.dtype, device=rel_codes.device)
    if N == 0 or K == 0:
        return out
    acc = tl_accumulation(rel_codes.dtype)
    block_k = min(next_pow2(K), 32)
    block_n = max(1, ELEM_BLOCK // block_k)
    grid = (cdiv(N, block_n), cdiv(K, block_k))
    check_grid(grid)
    height, width = (0.0, 0.0) if image_size is None else image_size
    dt = accumulation_dtype(rel_codes.dtype)
    scalars = [scalar_bits(float(v), dt) for v in (*weights, clip, height, width)]
    _decode_kernel[grid](rel_codes, boxes, out, N, K, rel_codes.stride(0), rel_codes.stride(1),
                         boxes.stride(0), boxes.stride(1), *scalars,
                         CLIP_TO_IMAGE=image_size is not None, ACC=acc,
                         BLOCK_N=block_n, BLOCK_K=block_k)
    return out


# --------------------------------------------------------------------------
# NMS: in-segment IoU bitmask, then a per-segment scan
# --------------------------------------------------------------------------
@triton.jit
def _suppresses(boxes_ptr, ix1, iy1, ix2, iy2, rows, cols, needed, e, thr):
    """[rows, cols]: whether row box i suppresses column box j (a later box of
    its segment with IoU > thr), with torchvision's CPU nms IoU, operation
    for operation."""
    cm = needed[:, None] & (cols < e[:, None]) & (cols > rows[:, None])
    cb = boxes_ptr + tl.where(cm, cols, 0) * 4
    x1 = tl.load(cb, mask=cm, other=0)
    y1 = tl.load(cb + 1, mask=cm, other=0)
    x2 = tl.load(cb + 2, mask=cm, other=0)
    y2 = tl.load(cb + 3, mask=cm, other=0)
    iarea = (ix2 - ix1) * (iy2 - iy1)
    area = (x2 - x1) * (y2 - y1)
    xx1 = _tv_max(ix1[:, None], x1)
    yy1 = _tv_max(iy1[:, None], y1)
    xx2 = _tv_min(ix2[:, None], x2)
    yy2 = _tv_min(iy2[:, None], y2)
    w = _tv_max(0.0, xx2 - xx1)
    h = _tv_max(0.0, yy2 - yy1)
    inter = w * h
    ovr = div(inter, iarea[:, None] + area - inter)
    return cm & (ovr > thr)


@triton.jit
def _nms_mask_kernel(boxes_ptr, seg_start_ptr, seg_end_ptr, row_offset_ptr, mask_ptr, N,
                     capacity, thr_bits,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, WORD_BITS: tl.constexpr,
                     CHUNK: tl.constexpr):
    pm = tl.program_id(0)
    pw = tl.program_id(1)
    rows = pm.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < N
    a = tl.load(seg_start_ptr + rows, mask=rm, other=0)
    e = tl.load(seg_end_ptr + rows, mask=rm, other=0)
    words = (e - a + WORD_BITS - 1) // WORD_BITS  # per row of the row's segment
    first = tl.load(row_offset_ptr + rows, mask=rm, other=0)  # the row's first word
    # word pw holds columns of the row's segment, not only columns before the
    # row's own 64-row block (the scan reads words from that block on), and
    # the row fits the buffer (else the caller launches again, sized exactly)
    needed = (rm & (pw < words) & (pw >= (rows - a) // WORD_BITS)
              & (first + words <= capacity))
    if tl.max(needed.to(tl.int32), axis=0) > 0:
        thr = from_bits(thr_bits, ACC)
        rb = boxes_ptr + rows * 4
        ix1 = tl.load(rb, mask=rm, other=0)
        iy1 = tl.load(rb + 1, mask=rm, other=0)
        ix2 = tl.load(rb + 2, mask=rm, other=0)
        iy2 = tl.load(rb + 3, mask=rm, other=0)
        first_col = a + pw.to(tl.int64) * WORD_BITS
        word = tl.zeros([BLOCK_M], tl.int64)
        # CHUNK columns at a time: a [BLOCK_M, 64] tile spills on sm_90
        for c in range(0, WORD_BITS, CHUNK):
            t = (c + tl.arange(0, CHUNK)).to(tl.int64)
            sup = _suppresses(boxes_ptr, ix1, iy1, ix2, iy2, rows,
                              first_col[:, None] + t[None, :], needed, e, thr)
            bits = tl.where(sup, tl.full([1, CHUNK], 1, tl.int64) << t[None, :], 0)
            word += tl.sum(bits, axis=1)  # distinct bits: their sum is their OR
        tl.store(mask_ptr + first + pw, word, mask=needed)


@triton.jit
def _scan_segment(seg_mask, removed_ptr, keep_ptr, a, e,
                  WORD_BITS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Segment [a, e), whose rows' words start at ``seg_mask``: ``nblocks``
    words per row, which is also its number of 64-row blocks."""
    r = tl.arange(0, WORD_BITS)
    r64 = r.to(tl.int64)
    one = tl.full([], 1, tl.int64)
    nblocks = (e - a + WORD_BITS - 1) // WORD_BITS
    for k in range(0, nblocks):
        base = a + k * WORD_BITS
        rows = base + r64
        rvalid = rows < e
        row_mask = seg_mask + (rows - a) * nblocks
        diag = tl.load(row_mask + k, mask=rvalid, other=0)
        removed = tl.load(removed_ptr + a + k)
        kept = tl.zeros([], tl.int64)
        nrows = tl.minimum(e - base, WORD_BITS)
        for i in range(0, nrows):
            row_word = tl.sum(tl.where(r == i, diag, 0), axis=0)
            bit = one << i
            alive = (removed & bit) == 0
            removed = tl.where(alive, removed | row_word, removed)
            kept = tl.where(alive, kept | bit, kept)
        flags = ((kept >> r64) & 1) != 0
        tl.store(keep_ptr + rows, flags.to(tl.int8), mask=rvalid)
        live = flags & rvalid
        for w0 in range(k + 1, nblocks, BLOCK_W):
            ws = w0 + tl.arange(0, BLOCK_W).to(tl.int64)
            wvalid = ws < nblocks
            words = tl.load(row_mask[:, None] + ws[None, :],
                            mask=live[:, None] & wvalid[None, :], other=0)
            hit = tl.reduce(words, 0, _or)
            old = tl.load(removed_ptr + a + ws, mask=wvalid, other=0)
            tl.store(removed_ptr + a + ws, old | hit, mask=wvalid)
        tl.debug_barrier()  # the next block reads what this one stored


@triton.jit
def _nms_scan_kernel(mask_ptr, seg_start_ptr, seg_end_ptr, row_offset_ptr, removed_ptr,
                     keep_ptr, N, capacity, max_words,
                     WORD_BITS: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program p scans the segments that start in rows [64 p, 64 p + 64).
    ``removed`` holds a segment's words at [seg_start, seg_start + blocks),
    inside its own rows, so segments never share one. A segment the mask
    launch did not cover (more than ``max_words`` words per row, or past
    ``capacity``) is skipped: the caller launches again, sized exactly."""
    p = tl.program_id(0)
    lo = p.to(tl.int64) * WORD_BITS
    hi = tl.minimum(lo + WORD_BITS, N)
    pos = lo
    while pos < hi:
        a = tl.load(seg_start_ptr + pos)
        e = tl.load(seg_end_ptr + pos)
        if a == pos:
            first = tl.load(row_offset_ptr + a)
            words = (e - a + WORD_BITS - 1) // WORD_BITS
            if (words <= max_words) & (first + (e - a) * words <= capacity):
                _scan_segment(mask_ptr + first, removed_ptr, keep_ptr, a, e, WORD_BITS,
                              BLOCK_W)
        pos = e


def sort_segments(scores: torch.Tensor, keys: list[torch.Tensor]):
    """(order, sorted_order, seg_start, seg_end), all on the device, no sync:
    ``order`` sorts by (-score, index) (NaN scores first, as torch.sort
    descending and torchvision do); ``sorted_order`` by (keys..., -score,
    index), the most significant key first; ``seg_start``/``seg_end`` bound
    each sorted position's run of equal keys."""
    n = scores.shape[0]
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_order = order
    for key in reversed(keys):
        sorted_order = sorted_order[torch.sort(key[sorted_order], stable=True).indices]
    positions = torch.arange(n, device=scores.device)
    boundary = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if n:
        boundary[0] = True
    for key in keys:
        k = key[sorted_order]
        boundary[1:] |= k[1:] != k[:-1]
    seg_start = torch.where(boundary, positions, 0).cummax(0).values
    # the end of a run: the next boundary after each position, or n
    next_boundary = torch.full_like(positions, n)
    next_boundary[:-1] = torch.where(boundary[1:], positions[1:], n)
    seg_end = next_boundary.flip(0).cummin(0).values.flip(0)
    return order, sorted_order, seg_start, seg_end


def bitmask_layout(seg_start: torch.Tensor, seg_end: torch.Tensor):
    """(row_offset, needed), int64 on the device, no sync: each sorted box's
    first word in the bitmask (a segment's rows hold ceil(n_s / 64) words
    each, segment after segment), and ``[longest segment, total words]``,
    the size a launch needs to cover every segment."""
    lengths = seg_end - seg_start
    row_words = (lengths + WORD - 1) // WORD
    ends = torch.cumsum(row_words, 0)
    return ends - row_words, torch.stack([lengths.max(), ends[-1]])


def bitmask_size(n: int, segmented: bool) -> tuple[int, int]:
    """(longest, words): the bitmask size a launch assumes before the real
    one is known on the host: exact for one segment; for several, enough for
    segments of up to GUESS_SEGMENT boxes (n * ceil(min(n, GUESS_SEGMENT) /
    64) words bound sum n_s * ceil(n_s / 64) when no n_s is longer)."""
    longest = min(n, GUESS_SEGMENT) if segmented else n
    return longest, n * cdiv(longest, WORD)


def nms_keep(boxes: torch.Tensor, scores: torch.Tensor, keys: list[torch.Tensor],
             iou_threshold: float, size: tuple[int, int] | None = None):
    """(order, keep, needed, size). ``order`` is the (-score, index)
    permutation, ``keep`` a bool per box (original index) saying whether
    segmented NMS keeps it. ``size`` = (longest segment, words) is what the
    bitmask was sized for (``bitmask_size`` when not given) and ``needed`` the
    int64 device pair the boxes need: ``keep`` is exact when needed[0] <=
    size[0]; else launch again with ``size=needed``. Two launches whatever
    the number of segments; no host sync."""
    n = boxes.shape[0]
    device = boxes.device
    order, sorted_order, seg_start, seg_end = sort_segments(scores, keys)
    if n == 0:
        return (order, torch.zeros(0, dtype=torch.bool, device=device),
                torch.zeros(2, dtype=torch.int64, device=device), (0, 0))
    row_offset, needed = bitmask_layout(seg_start, seg_end)
    longest, capacity = size if size is not None else bitmask_size(n, bool(keys))
    max_words = cdiv(longest, WORD)
    acc = accumulation_dtype(boxes.dtype)
    sorted_boxes = boxes[sorted_order].to(acc).contiguous()
    mask = empty(capacity, dtype=torch.int64, device=device)
    grid = (cdiv(n, NMS_BLOCK_M), max_words)
    check_grid(grid)
    _nms_mask_kernel[grid](sorted_boxes, seg_start, seg_end, row_offset, mask, n, capacity,
                           _threshold_bits(iou_threshold, acc), ACC=tl_accumulation(acc),
                           BLOCK_M=NMS_BLOCK_M, WORD_BITS=WORD, CHUNK=NMS_CHUNK,
                           enable_fp_fusion=False)  # torchvision's IoU, step for step (no FMA)
    removed = torch.zeros(n, dtype=torch.int64, device=device)
    keep_sorted = empty(n, dtype=torch.int8, device=device)
    _nms_scan_kernel[(cdiv(n, WORD),)](mask, seg_start, seg_end, row_offset, removed,
                                              keep_sorted, n, capacity, max_words,
                                              WORD_BITS=WORD, BLOCK_W=SCAN_BLOCK_W,
                                              num_warps=1)
    keep = torch.empty(n, dtype=torch.bool, device=device)
    keep[sorted_order] = keep_sorted.bool()
    return order, keep, needed, (longest, capacity)
