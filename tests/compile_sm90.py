"""Compile every kernel variant for sm_90 (H100) ahead of time, without a GPU.

The interpreter runs kernels as numpy code, so a kernel can pass every CPU
test and still fail to compile (constexpr rules, dtype mixes). Triton ships
ptxas, so the compiler itself can be run here. Run in a child process
without TRITON_INTERPRET (see test_compile.py): `python tests/compile_sm90.py`.
"""
import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from segops.kernels import conv, conv_transpose, overlap, roi_align  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def compile_variant(fn, pointer_types: dict, constexprs: dict, num_warps: int = 4) -> None:
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(pointer_types)
    signature.update({name: "constexpr" for name in constexprs})
    keyed = {(fn.arg_names.index(name),): value for name, value in constexprs.items()}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=keyed), target=TARGET,
                   options={"num_warps": num_warps})


def overlap_variants():
    # SQUARED and MIN_INTERSECTION only add independent terms: compiling them
    # together and both off covers their code without the full product
    for act, dense, flags, acc in itertools.product(
            (0, 1, 2), (False, True), (False, True), ("fp32", "fp64")):
        squared = minimum = flags
        if acc == "fp64" and flags:
            continue  # the fp64 variants only differ in ACC
        x = "fp64" if acc == "fp64" else "bf16"
        t = "fp32" if dense else "i64"
        constexprs = dict(ACTIVATION=act, DENSE_TARGET=dense, HAS_IGNORE=True, SQUARED=squared,
                          MIN_INTERSECTION=minimum, BLOCK_C=32, BLOCK_S=256,
                          ACC=tl.float64 if acc == "fp64" else tl.float32)
        yield (overlap._overlap_sums_fwd_kernel,
               dict(x_ptr=f"*{x}", t_ptr=f"*{t}", part_ptr=f"*{acc}"), constexprs)
        yield (overlap._overlap_sums_bwd_kernel,
               dict(x_ptr=f"*{x}", t_ptr=f"*{t}", gi_ptr=f"*{acc}", gp_ptr=f"*{acc}",
                    gx_ptr=f"*{x}"), constexprs)
    for scores, bins in itertools.product((False, True), (512, 0)):
        yield (overlap._confusion_matrix_kernel,
               dict(pred_ptr="*fp16" if scores else "*u8", t_ptr="*i64", cm_ptr="*i64"),
               dict(PRED_IS_SCORES=scores, HAS_IGNORE=True, BLOCK_C=32, BLOCK_S=256,
                    NUM_BINS=bins, ACC=tl.float32))


def roi_align_variants():
    for aligned, max_pool, levels, channels_last, dtype in itertools.product(
            (False, True), (False, True), (False, True), (False, True),
            ("bf16", "fp16", "fp32", "fp64")):
        if dtype != "bf16" and (aligned or levels or not channels_last):
            continue  # the dtype only changes loads, stores and ACC
        acc = "fp64" if dtype == "fp64" else "fp32"
        common = dict(ALIGNED=aligned, MAX_POOL=max_pool, CHANNELS_LAST=channels_last,
                      ACC=tl.float64 if acc == "fp64" else tl.float32)
        blocks = dict(BLOCK_C=64, BLOCK_P=16) if channels_last else dict(BLOCK_C=16, BLOCK_P=64)
        tables = dict(rois_ptr=f"*{acc}", scale_ptr=f"*{acc}")
        yield (roi_align._roi_align_fwd_kernel,
               dict(x_ptr=f"*{dtype}", level_ptr="*i64", table_ptr="*i64", out_ptr=f"*{dtype}",
                    **tables),
               dict(HAS_LEVELS=levels, **blocks, **common))
        yield (roi_align._roi_align_bwd_atomic_kernel,
               dict(grad_ptr=f"*{dtype}", x_ptr=f"*{dtype}", level_ptr="*i64",
                    x_table_ptr="*i64", gx_table_ptr="*i64", gx_ptr=f"*{acc}", **tables),
               dict(HAS_LEVELS=levels, **blocks, **common))
        if not levels:  # the deterministic kernel always reads the level tables
            yield (roi_align._roi_align_bwd_deterministic_kernel,
                   dict(grad_ptr=f"*{dtype}", x_ptr=f"*{dtype}", order_ptr="*i64",
                        segment_ptr="*i64", tiles_ptr="*i64", x_table_ptr="*i64",
                        gx_table_ptr="*i64", gx_ptr=f"*{dtype}", **tables),
                   dict(TILE_H=8, TILE_W=8, BLOCK_C=32, **common))


def conv_variants():
    dtypes = [("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False), ("fp64", False)]
    tiles = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)]
    for (dtype, tf32), flags, blocks in itertools.product(dtypes, (False, True), tiles):
        if blocks["BLOCK_M"] == 128 and (flags or dtype not in ("bf16", "fp32") or not tf32
                                         and dtype == "fp32"):
            continue  # the tuner's large tiles: checked in the dtypes it runs most
        acc = "fp64" if dtype == "fp64" else "fp32"
        common = dict(ALLOW_TF32=tf32, UPCAST=False, ACC=tl.float64 if acc == "fp64" else tl.float32, **blocks)
        warps = 8 if blocks["BLOCK_M"] == 128 else 4
        yield (conv._conv2d_fwd_kernel,
               dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", y_ptr=f"*{dtype}"),
               dict(HAS_BIAS=flags, RELU=flags, **common), warps)
        yield (conv._conv2d_bwd_input_kernel,
               dict(dy_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", dx_ptr=f"*{dtype}"),
               dict(HAS_BIAS=flags, **common), warps)
        if not flags:
            yield (conv._conv2d_bwd_weight_kernel,
                   dict(dy_ptr=f"*{dtype}", x_ptr=f"*{dtype}", part_ptr=f"*{acc}"), common, warps)


def depthwise_variants():
    for dtype, flags in [("bf16", True), ("fp16", False), ("fp32", True), ("fp64", False)]:
        acc = tl.float64 if dtype == "fp64" else tl.float32
        tile = dict(BLOCK_M=64, BLOCK_C=64, ACC=acc)
        yield (conv._depthwise_fwd_kernel,
               dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", y_ptr=f"*{dtype}"),
               dict(HAS_BIAS=flags, RELU=flags, **tile))
        yield (conv._depthwise_bwd_input_kernel,
               dict(dy_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", dx_ptr=f"*{dtype}"),
               dict(HAS_BIAS=flags, **tile))
        yield (conv._depthwise_bwd_weight_kernel,
               dict(dy_ptr=f"*{dtype}", x_ptr=f"*{dtype}",
                    part_ptr="*fp64" if dtype == "fp64" else "*fp32"), tile)


def conv_transpose_variants():
    for dtype, tf32, bias in [("bf16", False, True), ("fp16", False, False), ("fp32", True, True),
                              ("fp32", False, False), ("fp64", False, True)]:
        acc = tl.float64 if dtype == "fp64" else tl.float32
        yield (conv_transpose._conv_transpose_k_eq_s_kernel,
               dict(x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", b_ptr=f"*{dtype}", y_ptr=f"*{dtype}"),
               dict(HAS_BIAS=bias, ALLOW_TF32=tf32, UPCAST=False, ACC=acc, BLOCK_M=64,
                    BLOCK_N=64, BLOCK_K=32))


VARIANTS = (overlap_variants, roi_align_variants, conv_variants, depthwise_variants,
            conv_transpose_variants)


def main() -> int:
    count = 0
    only = sys.argv[1:]
    variants = [v for v in VARIANTS if not only or v.__name__.split("_variants")[0] in only]
    for fn, pointers, constexprs, *warps in itertools.chain.from_iterable(
            v() for v in variants):
        try:
            compile_variant(fn, pointers, constexprs, *warps)
        except Exception as error:  # report which variant, then fail
            print(f"FAILED {fn.__name__} {pointers} {constexprs}: {error}\n{error.__cause__!r}")
            return 1
        count += 1
    print(f"compiled {count} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
