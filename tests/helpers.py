"""Comparison helpers for the tests (imported as `helpers`; tests/ is on
pytest's pythonpath)."""
from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# relative RMS error allowed for results computed from inputs of each dtype
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
# float dtypes the kernels run in on this machine: float64 in the interpreter
# (exact comparisons), the GPU dtypes on CUDA
KERNEL_DTYPES = (
    [torch.float32, torch.float16, torch.bfloat16] if ON_GPU
    else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
)


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(relative RMS error, max abs error) of actual against expected, in float64."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite = torch.isfinite(e)
    diff = (a - e)[finite]
    norm = e[finite].norm().item()
    rel_rms = diff.norm().item() / max(norm, 1e-30) if diff.numel() else 0.0
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    return rel_rms, max_abs


# how far one element may stray, in units of the dtype's relative tolerance,
# from |expected| + RMS(expected) (the RMS term covers elements that are
# ~0 after cancellation)
ELEMENT_FACTOR = 8.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                 atol: float = 0.0, name: str = "output") -> None:
    """Same shape, NaN/inf in the same places, relative RMS error <= rtol
    (or every element within atol, for tensors that are ~0 everywhere), and
    every element within ELEMENT_FACTOR * rtol * (|expected| + RMS(expected))
    + atol: one wrong element fails even when the RMS error is small."""
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), \
        f"{name}: NaN at {torch.nonzero(torch.isnan(a) != torch.isnan(e))[:5].tolist()}"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{name}: inf mismatch"
    rel_rms, max_abs = error_report(a, e)
    ok = rel_rms <= rtol or max_abs <= atol
    assert ok, f"{name}: relative RMS error {rel_rms:.3e} > {rtol:.1e} (max abs error {max_abs:.3e})"
    finite = torch.isfinite(e)
    if not finite.any():
        return
    a, e = a[finite], e[finite]
    rms = e.norm().item() / e.numel() ** 0.5
    bound = ELEMENT_FACTOR * rtol * (e.abs() + rms) + atol
    over = (a - e).abs() > bound
    if over.any():
        i = int(torch.nonzero(over)[0])
        raise AssertionError(
            f"{name}: {int(over.sum())} element(s) off by more than {ELEMENT_FACTOR:g} * rtol "
            f"* (|expected| + RMS); first: {a[i].item():.6g} vs {e[i].item():.6g} "
            f"(RMS of expected {rms:.3g})")


def like_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t in a memory format: 'contiguous', 'channels_last' (4-D and 5-D) or
    'strided' (a non-contiguous view with the same values)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt) if t.dim() in (4, 5) else t.contiguous()
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(layout)
