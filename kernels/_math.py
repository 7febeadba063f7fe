"""Device math the kernels share."""
import triton
import triton.language as tl


def divisor_magic(d: int) -> tuple[int, int]:
    """(multiplier, shift) for ``fast_div`` by the positive int32 ``d``: the
    round-up reciprocal 2^p / d with p = 31 + ceil(log2 d), exact for every
    dividend in [0, 2^31) (Granlund and Montgomery; CUTLASS's FastDivmod)."""
    if d == 1:
        return 0, 0
    p = 31 + (d - 1).bit_length()
    multiplier = -(-(1 << p) // d)  # in (2^31, 2^32): passed as the int32 of its bits
    return multiplier - (1 << 32) if multiplier >= 1 << 31 else multiplier, p - 32


@triton.jit
def fast_div(x, d, multiplier, shift):
    """x // d for int32 x in [0, 2^31) with (multiplier, shift) =
    divisor_magic(d): a high multiply and a shift where a division by a
    runtime value compiles to some twenty instructions per element. The
    multiplier arrives as an int32 whose bits are the unsigned value (one
    argument type for every divisor: no extra compile)."""
    q = (tl.umulhi(x.to(tl.uint32), multiplier.to(tl.uint32)) >> shift).to(tl.int32)
    return tl.where(d == 1, x, q)


@triton.jit
def div(a, b):
    """a / b rounded to nearest, as the peers (ATen, torchvision) divide: a
    plain fp32 ``/`` compiles to an approximate division (div.full.f32, 2
    ulp), which can push a whole-number quotient past a ceil or truncation.
    fp64 ``/`` is already IEEE; tl.math.div_rn takes fp32 only."""
    if a.dtype == tl.float32:
        return tl.math.div_rn(a, b.to(tl.float32))
    return a / b


@triton.jit
def from_bits(bits, ACC: tl.constexpr):
    """The float of ``ACC`` (float64 or float32) whose bits
    ``_layout.scalar_bits`` passed."""
    if ACC == tl.float64:
        return bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        return bits.to(tl.int32).to(tl.float32, bitcast=True)
