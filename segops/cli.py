"""The `segops` command: info, check, bench."""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from . import _dispatch


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> int:
    """Versions, the device, and which implementation runs the ops."""
    print(f"segops        {_version('segops-triton')}")
    print(f"python        {platform.python_version()}")
    for package in ("torch", "triton", "numpy", "torchvision"):
        print(f"{package:<13} {_version(package)}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"device        cuda: {name} (sm {cap}), CUDA {torch.version.cuda}")
        device = "cuda"
    else:
        print("device        cpu (no CUDA device)")
        device = "cpu"
    path = _dispatch.path_for(device)
    print(f"dispatch      {device} tensors -> {path}")
    if path in (_dispatch.NATIVE, _dispatch.REFERENCE):
        for line in NATIVE_PATHS:
            print(f"              {line}")
        print("              (set TRITON_INTERPRET=1 before importing segops to run the "
              "Triton kernels on CPU through the interpreter)")
    return 0


# what each op runs off the GPU (DESIGN.md, "Dispatch")
NATIVE_PATHS = (
    "atrous_conv2d, conv_transpose2d -> ATen (F.conv2d, F.conv_transpose2d)",
    "roi_align, multi_scale_roi_align (avg pooling) -> torchvision.ops.roi_align "
    "when installed, else reference",
    "nms, batched_nms(_per_image), box_iou, clip_boxes_to_image -> torchvision.ops when "
    "installed, else reference",
    "mask_targets -> torchvision.ops.roi_align on the float masks when installed, else reference",
    "Dice/IoU sums, confusion matrix, max-pool RoIAlign, decode_boxes, paste_masks -> "
    "reference (no native op with the same semantics)",
)


def check() -> int:
    """Kernel-vs-reference self-check; on a CPU-only machine it runs the
    kernels through Triton's interpreter in a child process."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    return subprocess.call([sys.executable, "-m", "segops.selfcheck"], env=env)


def bench(args) -> int:
    if args.codegen:
        return codegen(args)
    from .benchmarks import run as bench_run
    return bench_run.main(args)


def codegen(args) -> int:
    """`segops bench --codegen`: the codegen report (segops.benchmarks.codegen)
    in a child process without TRITON_INTERPRET, which would replace the
    compiler."""
    argv = [] if args.out is None else ["--json", args.out]
    if args.ops:
        from .benchmarks.codegen import OPS
        unknown = [op for op in args.ops if op not in OPS]
        if unknown:
            print(f"--codegen covers the op families {list(OPS)}, not {unknown}",
                  file=sys.stderr)
            return 2
        argv += ["--ops", *args.ops]
    if args.quick:
        argv.append("--ci")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.call([sys.executable, "-m", "segops.benchmarks.codegen", *argv], env=env)


def _given_or(value, default):
    return default if value is None else value


def demo(args) -> int:
    if args.model == "maskrcnn":
        return _demo_maskrcnn(args)
    from .demo import DemoConfig, run
    config = DemoConfig(epochs=_given_or(args.epochs, DemoConfig.epochs),
                        out=_given_or(args.out, DemoConfig.out), seed=args.seed,
                        progress=not args.no_progress)
    result = run(config)
    print(f"done in {result['seconds']:.0f} s: validation mIoU {result['miou']:.3f}; "
          f"picture at {result['png']}")
    return 0


def _demo_maskrcnn(args) -> int:
    from .demo_maskrcnn import MaskRCNNDemoConfig, run
    defaults = MaskRCNNDemoConfig()
    config = MaskRCNNDemoConfig(epochs=_given_or(args.epochs, defaults.epochs),
                                out=_given_or(args.out, defaults.out), seed=args.seed,
                                progress=not args.no_progress)
    result = run(config)
    metrics = result["metrics"]
    print(f"done in {result['seconds']:.0f} s: mask AP50 {metrics['segm_map_50']:.3f}, box AP50 "
          f"{metrics['bbox_map_50']:.3f}; picture at {result['png']}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _png_path(text: str) -> str:
    """A path whose folder exists: checked before minutes of training, not
    when the picture is written."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="segops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device and dispatch path")
    p_info.add_argument("--check", action="store_true", help="also run the self-check")
    sub.add_parser("check", help="run every kernel against its reference on tiny inputs")
    p_demo = sub.add_parser("demo", help="train a small U-Net (CPU: < 3 min) or Mask R-CNN "
                            "(CPU: ~5 min) on synthetic shapes")
    p_demo.add_argument("model", nargs="?", default="unet", choices=("unet", "maskrcnn"))
    p_demo.add_argument("--epochs", type=_positive_int, default=None,
                        help="default: 10 (unet), 12 (maskrcnn)")
    p_demo.add_argument("--out", type=_png_path, default=None,
                        help="where to write the PNG (default: "
                        "segops-demo.png / segops-maskrcnn-demo.png)")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_bench = sub.add_parser("bench", help="benchmark the ops against their baselines")
    p_bench.add_argument("--quick", action="store_true", help="a few shapes per op (minutes)")
    p_bench.add_argument("--ops", nargs="*", default=None, help="op families to run (default: all)")
    p_bench.add_argument("--out", default=None, help="folder for <gpu>.json and the plot "
                         "(with --codegen: the JSON file to write)")
    p_bench.add_argument("--codegen", action="store_true",
                         help="no timings: compile every kernel variant at the benchmark "
                         "shapes for sm_90 and report registers, spills, shared memory and "
                         "instructions from the SASS (needs no GPU; --quick: the CI subset)")
    args = parser.parse_args(argv)
    if args.command == "info":
        code = info()
        return check() if args.check and code == 0 else code
    if args.command == "check":
        return check()
    if args.command == "demo":
        return demo(args)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
