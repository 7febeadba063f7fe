"""The comparison helper itself: it must catch what the op tests rely on it
to catch."""
import pytest
import torch
from helpers import RTOL, assert_close


def test_one_element_off_fails_at_bf16_tolerance():
    expected = torch.randn(65536, dtype=torch.float64)
    actual = expected.clone()
    i = int((expected.abs() - 1).abs().argmin())
    actual[i] *= 1.6  # one element 60% off: the relative RMS error is only ~0.2%
    with pytest.raises(AssertionError, match="element"):
        assert_close(actual, expected, RTOL[torch.bfloat16])


def test_rounding_to_the_dtype_passes():
    expected = torch.randn(4096, dtype=torch.float64)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert_close(expected.to(dtype), expected, RTOL[dtype])


def test_nan_and_shape_mismatches_fail():
    e = torch.randn(8, dtype=torch.float64)
    a = e.clone()
    a[3] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(a, e, 1e-5)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(e[:4], e, 1e-5)
