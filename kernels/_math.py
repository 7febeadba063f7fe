"""Device math the kernels share."""
import triton
import triton.language as tl


@triton.jit
def div(a, b):
    """a / b rounded to nearest, as the peers (ATen, torchvision) divide: a
    plain fp32 ``/`` compiles to an approximate division (div.full.f32, 2
    ulp), which can push a whole-number quotient past a ceil or truncation.
    fp64 ``/`` is already IEEE; tl.math.div_rn takes fp32 only."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b.to(tl.float32))
    return a / b
