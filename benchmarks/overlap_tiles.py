"""The Dice/IoU and confusion-matrix kernels alone, on a GPU, over their tile
sizes: what fraction of the copy bandwidth each launch reaches (issue 12's
target is 70%) and whether the launcher's default tile is the best one.

The benchmark family ``overlap`` times the whole op (argument checks, the
loss formula's small ops, autograd); this times one launcher call of
``kernels/overlap.py`` on fixed inputs, so host work and kernel speed can be
told apart. For each quick benchmark shape, dtype and layout:

* ``fwd``: ``overlap_sums_forward`` (softmax, index target): reads x and t;
* ``bwd``: ``overlap_sums_backward``: reads x and t, writes the gradient;
* ``cm``: ``confusion_matrix`` on the scores (argmax fused): reads x and t;

each at the launcher's default tile and at ``variants`` (BLOCK_S and warps
per program; the confusion matrix also with one program per pixel block
instead of the persistent grid), in bf16, NCHW and channels_last,
CUDA-event medians with L2 flushed (``harness.time_ms``). Each variant's
result is compared with the default's (``same``: counts exact, sums within
1e-4 relative, the gradient within two units in the last place of its
dtype: a different tile sums a pixel's classes in another order, and the
gradient p * (g - dot) cancels).

    python -m segops.benchmarks.overlap_tiles [--out DIR]

prints a table and writes ``DIR/overlap_tiles.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import harness

SHAPES = [(16, 21, (512, 512)), (2, 4, (128, 128, 128))]


def _inputs(N, C, spatial, dtype, channels_last, device):
    x = torch.randn(N, C, *spatial, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(spatial) == 2
                         else torch.channels_last_3d)
    return x, torch.randint(0, C, (N, *spatial), device=device)


def variants(block_c: int, default: dict) -> list[dict]:
    """Launcher overrides to time besides the ``default`` tile: 32 elements
    per thread on 4 warps, and 2048 elements on 8 warps (the tile before
    one-warp programs)."""
    tiles = [{"num_warps": 4, "block_s": max(16, 4096 // block_c)},
             {"num_warps": 8, "block_s": max(16, 2048 // block_c)}]
    return [tile for tile in tiles if tile != default]


def _launches(x, t, C, options):
    """(name, bytes moved, callable) of each launcher with ``options``
    (launcher keyword overrides), the confusion matrix also with one program
    per pixel block."""
    from ..kernels import overlap as kernels
    grad = torch.ones((x.shape[0], C), device=x.device, dtype=kernels.sums_dtype(x))
    nbytes = x.numel() * x.element_size() + t.numel() * t.element_size()
    return [
        ("fwd", nbytes, lambda: kernels.overlap_sums_forward(
            x, t, "softmax", None, False, **options)),
        ("bwd", nbytes + x.numel() * x.element_size(), lambda: kernels.overlap_sums_backward(
            grad, grad, x, t, "softmax", None, False, **options)),
        ("cm", nbytes, lambda: kernels.confusion_matrix(x, t, C, None, **options)),
        ("cm per-block", nbytes, lambda: kernels.confusion_matrix(
            x, t, C, None, programs=2**31 - 1, **options)),
    ]


def _same(got, want) -> bool:
    if got.dtype == torch.int64:
        return bool(torch.equal(got, want))
    ulp = torch.finfo(got.dtype).eps
    return bool(torch.allclose(got.float(), want.float(), rtol=max(1e-4, 2 * ulp), atol=1e-6))


def run(out: Path | None = None, *, shapes=SHAPES, dtype=torch.bfloat16, timer=None,
        peak: float | None = None, device: str = "cuda") -> list[dict]:
    """Time every launcher at each tile of each shape (``timer``, ``peak``
    and ``device`` let the CPU tests run it through the interpreter)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise harness.NoGPU("the tile sweep times kernels: it needs a CUDA device")
    from ..kernels import overlap as kernels
    timer = timer or harness.time_ms
    peak = peak or harness.copy_bandwidth_gbs()
    print(f"copy bandwidth {peak:.0f} GB/s")
    rows = []
    for N, C, spatial in shapes:
        for channels_last in (False, True):
            x, t = _inputs(N, C, spatial, dtype, channels_last, device)
            block_c, default_s, default_w = kernels._tile(C, None, None)
            reference = {}
            default = {"num_warps": default_w, "block_s": default_s}
            for options in [{}] + variants(block_c, default):
                block_s = options.get("block_s", default_s)
                warps = options.get("num_warps", default_w)
                for name, nbytes, fn in _launches(x, t, C, options):
                    result = fn()
                    kind = name.split()[0]
                    reference.setdefault(kind, result)
                    ms = timer(fn)
                    row = {"kernel": name, "shape": f"{N}x{C}x{'x'.join(map(str, spatial))}",
                           "dtype": str(dtype).replace("torch.", ""),
                           "layout": "cl" if channels_last else "nchw",
                           "block": [block_c, block_s], "warps": warps,
                           "default": not options and name in ("fwd", "bwd", "cm"),
                           "same": _same(result, reference[kind]),
                           "ms": ms, "gbs": nbytes / ms / 1e6}
                    row["of_copy"] = row["gbs"] / peak
                    rows.append(row)
                    print(format_row(row), flush=True)
                    if out is not None:
                        _write(out, rows, peak)
            del x, t
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_row(row: dict) -> str:
    mark = "*" if row["default"] else " "
    same = "" if row["same"] else "  DIFFERS from the default"
    return (f"{row['kernel']:<13} {row['shape']:<16} {row['dtype']:<9} {row['layout']:<5} "
            f"C{row['block'][0]:<4} S{row['block'][1]:<5} w{row['warps']}{mark} {row['ms']:8.3f} ms "
            f"{row['gbs']:7.0f} GB/s {100 * row['of_copy']:5.1f}% of copy{same}")


def _write(out: Path, rows: list[dict], peak: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap_tiles.json").write_text(json.dumps(
        {"environment": harness.environment(), "copy_gbs": peak, "rows": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segops.benchmarks.overlap_tiles",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for overlap_tiles.json")
    args = parser.parse_args(argv)
    try:
        run(None if args.out is None else Path(args.out))
    except harness.NoGPU as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
