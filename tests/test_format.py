"""segops._format: the memory-format rule every op shares, against torch's
own statement of ATen's (``torch._prims_common.suggest_memory_format``, the
rule the meta kernels use) and ``torch.empty``'s strides."""
import itertools

import pytest
import torch
from torch._prims_common import suggest_memory_format

from segops._format import format_strides, in_format, memory_format_of

SIZES = (0, 1, 2, 3)
STRIDES = (0, 1, 2, 3, 6, 12)


@pytest.mark.parametrize("sizes", list(itertools.product(SIZES, repeat=4)),
                         ids=lambda s: "x".join(map(str, s)))
def test_memory_format_is_atens_for_every_stride_order(sizes):
    """Every size (empty and size-1 axes included) with every combination
    of small strides: dense or not, overlapping or not."""
    storage = torch.empty(256)
    for strides in itertools.product(STRIDES, repeat=4):
        t = storage.as_strided(sizes, strides)
        assert memory_format_of(t) == suggest_memory_format(t), strides


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_format_strides_are_torch_emptys(fmt):
    for sizes in itertools.product(SIZES, repeat=4):
        assert format_strides(sizes, fmt) == torch.empty(sizes, memory_format=fmt).stride()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("sizes", [(2, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 1), (2, 1, 1, 1),
                                   (0, 3, 4, 5)])
def test_in_format_gives_the_formats_strides_and_the_same_values(sizes, fmt):
    """A copy where the tensor is not dense in the format, a re-strided view
    where it is but its size-1 axes say otherwise, the tensor itself where
    its strides are the format's already."""
    for source in (torch.randn(sizes), torch.randn(sizes).to(memory_format=torch.channels_last),
                   torch.randn(*sizes[:-1], 2 * sizes[-1])[..., ::2]):
        out = in_format(source, fmt)
        assert out.stride() == format_strides(sizes, fmt)
        assert torch.equal(out, source)
        if source.stride() == out.stride():
            assert out is source
