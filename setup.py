"""Install segops. `kernels/` and `benchmarks/` ship as the subpackages
`segops.kernels` and `segops.benchmarks` (never as top-level packages: PyPI
already has an unrelated `kernels`)."""
from setuptools import setup

setup(
    name="segops-triton",
    version="0.1.0",
    description="Triton GPU kernels for segmentation: atrous and transposed "
    "convolution, RoIAlign, fused IoU/Dice reductions, and models built on them.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "segops",
        "segops.ops",
        "segops.reference",
        "segops.nn",
        "segops.metrics",
        "segops.models",
        "segops.models.detection",
        "segops.kernels",
        "segops.benchmarks",
    ],
    package_dir={
        "segops": "segops",
        "segops.kernels": "kernels",
        "segops.benchmarks": "benchmarks",
    },
    install_requires=[
        "torch>=2.7",  # segops.MIN_TORCH: older torch cannot register the custom ops
        "numpy",
        "tqdm",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",
            "pytest-timeout",  # a hung kernel loop fails its test (timeout in pytest.ini)
            "pytest-benchmark",
            "hypothesis",
            "torchvision",
            # peers whose numbers the tests compare against (skipped if absent)
            "torchmetrics",
            "segmentation-models-pytorch>=0.6",
            "pycocotools",  # COCOeval: the peer of segops.metrics.MeanAveragePrecision
        ],
        "bench": ["matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["segops=segops.cli:main"]},
)
