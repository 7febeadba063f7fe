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


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    yield
