"""Test setup shared by every test (DESIGN.md, "Testing").

* Without a CUDA device, TRITON_INTERPRET=1 is set here, before anything
  imports triton, so the Triton kernels run on CPU through the interpreter.
* Kernel outputs start as NaN (SEGOPS_POISON_OUTPUTS) so unwritten elements fail.
* Autotuning is off (SEGOPS_AUTOTUNE=0): one default config per kernel.
* Every test gets its own seed, derived from its id.
The comparison helpers live in tests/helpers.py.
"""
import os
import random
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["SEGOPS_POISON_OUTPUTS"] = "1"
os.environ.setdefault("SEGOPS_AUTOTUNE", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    """Triton 3.6's interpreter (torch 2.11's Triton) cannot run a kernel
    loop with a runtime bound under numpy >= 2.4 (triton-lang/triton#9171):
    say so once instead of failing most kernel tests with an InterpreterError."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton
    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(p) for p in np.__version__.split(".")[:2])
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        pytest.exit(f"triton {triton.__version__}'s interpreter fails under numpy "
                    f"{np.__version__} (triton-lang/triton#9171): install numpy<2.4 or "
                    "triton>=3.7 to run the kernel tests on CPU", returncode=4)


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    yield
