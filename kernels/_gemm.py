"""GEMM pieces the convolution kernels share (kernels/conv.py,
kernels/conv_transpose.py): the tensor-core multiply, precision flags, the
tuner's tiles and their pruning, the fixed tile, the launch, and the weight
and bias layouts the kernels read."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._layout import block_size, empty, next_pow2, tl_accumulation  # noqa: F401 (re-exported)

AUTOTUNE = os.environ.get("SEGOPS_AUTOTUNE", "1") != "0"

# Hopper-sized tiles for the tuner; (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
# 128x256 / 256x128 are left out: with a 128-register-per-thread fp32
# accumulator they spill (codegen report, issue 11).
HOPPER_TILES = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 3), (128, 128, 32, 4, 4),
]
# an H100/H200 SM's shared memory per block (227 KB)
SHARED_MEMORY_LIMIT = 227 * 1024


@triton.jit
def mma(acc, a, b, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b on tensor cores (TF32 only when allowed). out_dtype is
    the accumulator's: Triton 3.6 defaults it to fp32 and rejects an fp64
    accumulator otherwise."""
    if UPCAST:  # Triton's interpreter multiplies bf16 tiles wrongly: go through fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


def allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def precision(t: torch.Tensor) -> dict:
    """The dtype constexprs: TF32 per cuDNN's flag, fp32 (fp64) accumulation,
    and the interpreter's bf16 detour (see mma)."""
    return dict(ALLOW_TF32=allow_tf32(t.dtype), ACC=tl_accumulation(t.dtype),
                UPCAST=t.dtype == torch.bfloat16 and t.device.type != "cuda")


def shared_memory_bytes(block_m: int, block_n: int, block_k: int, stages: int,
                        element_size: int) -> int:
    """Shared memory the pipelined A (M x K) and B (K x N) tiles take."""
    return stages * (block_m * block_k + block_k * block_n) * element_size


def prune_configs(configs, named_args, **kwargs):
    """Drop the tiles that cannot run well for this launch's dtype: those
    whose pipelined operands do not fit an SM's shared memory (fp32 tiles
    take twice bf16's), and 128-row tiles on 4 warps where they spill
    (codegen report, issue 11): with fp32 (TF32) operands, and for the
    forward's fp32 split-K partials (``y_ptr`` fp32 under bf16 operands:
    the fp32 tile's store layout conversion tips 246 registers over).
    Channel counts that are not multiples of 16 keep only tiles of at most
    64x64: the JIT cannot prove their channel strides 16-byte aligned, the
    operands load element by element, and every larger tile spills (codegen
    report, FCN-8s's 21-channel upscore layers before conv.padded_channels,
    triton 3.6 and 3.8). The conv launchers pad counts above 16, so this now
    covers the smaller counts (an RGB stem), grouped convolutions and the
    k == stride transposed convolution: a precaution carried over from that
    evidence (no benchmark shape compiles them), to be relaxed if a device
    run shows a larger tile winning there without spills."""
    size = next(v.element_size() for v in named_args.values() if isinstance(v, torch.Tensor))
    out = named_args.get("y_ptr")
    fp32_tile = size >= 4 or (isinstance(out, torch.Tensor) and out.element_size() >= 4)
    scalar_operands = any(named_args.get(name, 0) % 16 for name in ("C_in", "C_out"))
    fits = [c for c in configs
            if shared_memory_bytes(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                   c.num_stages, size) <= SHARED_MEMORY_LIMIT
            and not (fp32_tile and c.kwargs["BLOCK_M"] >= 128 and c.num_warps < 8)
            and not (scalar_operands and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return fits or configs[-1:]


def tuner_configs() -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in HOPPER_TILES]


@functools.lru_cache(maxsize=None)
def tuned(kernel, key: tuple):
    """The kernel behind triton.autotune, keyed on the arguments ``key``
    names (results are cached per key, so a model's second step does not
    retune); tiles that cannot fit are pruned before timing."""
    return triton.autotune(configs=tuner_configs(), key=list(key),
                           prune_configs_by={"early_config_prune": prune_configs})(kernel)


def default_config(M: int, N: int, K: int) -> dict:
    """One fixed tile (autotuning off, deterministic mode, the interpreter):
    no larger than the problem, dims >= 16 as tl.dot needs (small channel
    counts are padded by masking)."""
    return {"BLOCK_M": block_size(M, 64, 16), "BLOCK_N": block_size(N, 64, 16),
            "BLOCK_K": block_size(K, 32, 16)}


def launch(kernel, grid_fn, args, constexprs, config, M, N, K, device, key) -> None:
    """Run ``kernel`` with ``config`` (a dict of block sizes, optionally
    num_warps/num_stages), the autotuner (keyed on the arguments ``key``
    names), or the default tile. Under torch.use_deterministic_algorithms
    the tuner is skipped: its pick (and with it BLOCK_K, the order of the
    sums) could differ between processes."""
    if (config is None and AUTOTUNE and device.type == "cuda"
            and not torch.are_deterministic_algorithms_enabled()):
        tuned(kernel, tuple(key))[grid_fn](*args, **constexprs)
        return
    config = dict(config or default_config(M, N, K))
    options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    kernel[grid_fn](*args, **constexprs, **config, **options)


def tune_bucket(pixels: int) -> int:
    """The autotune key's size bucket: a new image size within the same
    power of two reuses the tuned tile instead of retuning."""
    return next_pow2(pixels)


def gemm_weight(w: torch.Tensor, tf32_k_dim: int | None = None) -> torch.Tensor:
    """``w`` (4-D: two channel axes, then KH, KW) with a contiguous channel
    axis, as a GEMM operand wants it. Tensor cores take 16-bit tiles with
    either axis contiguous, so any weight that has one is used as is, and a
    default (contiguous) conv weight, which has neither for KH*KW > 1, gets
    dim 0 made contiguous by one small copy. TF32 needs the reduction axis
    contiguous (else Triton transposes the tile through 4-byte scalar
    loads): ``tf32_k_dim`` names it. The view keeps the logical shape: the
    kernels follow the strides.

    The copy is not cached across calls: a cache keyed on the weight's
    version counter would serve a stale copy after a write through
    ``weight.data`` (which has a counter of its own). A channels_last weight
    (``model.to(memory_format=torch.channels_last)``) has its input-channel
    axis contiguous and is never copied for bf16/fp16 or the TF32 forward."""
    if tf32_k_dim is None:
        if w.stride(0) == 1 or w.stride(1) == 1:
            return w
        contiguous = 0
    elif w.stride(tf32_k_dim) == 1:
        return w
    else:
        contiguous = tf32_k_dim
    order = (2, 3, 1 - contiguous, contiguous)
    inverse = [order.index(i) for i in range(4)]
    return w.permute(*order).contiguous().permute(*inverse)


# NCHW operands are converted to channels_last for the GEMM kernels: with the
# channel (reduction) axis strided, the operand tiles load as 2-byte scalars and
# the kernel spills (codegen report, issue 11); one copy is cheaper. The
# kernels then write a channels_last result that is copied into the NCHW
# output (a coalesced pass instead of scattered 2-byte stores).
def channels_last_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) with its channel axis contiguous (a copy if it is not)."""
    return t if t.stride(1) == 1 else t.contiguous(memory_format=torch.channels_last)


def channels_last_output(out: torch.Tensor) -> torch.Tensor:
    """``out`` itself when its channel axis is contiguous, else a channels_last
    buffer the kernel writes and the launcher copies into ``out``."""
    if out.stride(1) == 1:
        return out
    return empty(out.shape, dtype=out.dtype, device=out.device, memory_format=torch.channels_last)


def bias_vector(bias, placeholder):
    """The bias as the kernels read it (unit stride: a strided view is copied,
    it has C elements), or a placeholder pointer when there is none."""
    return placeholder if bias is None else bias.contiguous()


def fill_channels(out: torch.Tensor, bias) -> None:
    """out[:, c] = bias[c] (or 0): the value of pixels no tap reaches."""
    if bias is None:
        out.zero_()
    else:
        out.copy_(bias.to(out.dtype).view(1, -1, 1, 1).expand_as(out))
