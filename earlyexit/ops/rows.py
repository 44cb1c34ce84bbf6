"""Rows as raw words: the layout the compaction kernels move, whatever the dtype and trailing shape.

A tensor [N, ...] whose trailing dims are dense (any dim-0 stride) is viewed, without a copy, as
[N, W] machine words: the widest of int32/int16/uint8 that divides the row size, the row stride
and the start address. Moving words instead of typed elements lets one kernel serve every dtype
(bool, integers, fp16/bf16/fp32) and every trailing shape.
"""

import math

import torch

# Widest first; 4-byte words already give 16-byte vector accesses (4 per thread) on the GPU.
_WORDS = ((4, torch.int32), (2, torch.int16), (1, torch.uint8))


def rows_dense(x):
    """Whether the trailing dims of x (all but dim 0) are laid out contiguously; dim 0 may stride freely."""
    if x.is_contiguous() or x.numel() == 0:
        return True  # (an empty tensor: nothing to move, and .contiguous() would keep its strides)
    expected = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def dense_rows(x):
    """x itself when its rows are dense, else a contiguous copy (one extra pass over x)."""
    return x if rows_dense(x) else x.contiguous()


def _byte_rows(x):
    """[N, row_bytes] uint8 view of a row-dense tensor (no copy)."""
    if x.dim() < 1 or not rows_dense(x):
        raise ValueError("as_words: expected tensors of >= 1 dims with dense rows")
    elems = math.prod(x.shape[1:])
    # as_strided gives the unit inner stride that view(dtype) needs, even for size-1 trailing dims.
    return x.as_strided((x.shape[0], elems), (x.stride(0), 1)).view(torch.uint8)


def as_words(*xs):
    """View row-dense tensors [N_j, ...] of one row size as 2-D [N_j, W] word tensors sharing their memory.

    All views get the same word type (the widest that divides the row size and every row stride and
    start offset), so a kernel can copy rows between them word by word. The row stride in words is
    ``view.stride(0)``. A 0-d or non-row-dense input is a caller bug (ValueError).
    """
    byte_rows = [_byte_rows(x) for x in xs]
    sizes = [b.shape[1] for b in byte_rows]
    sizes += [b.stride(0) for b in byte_rows] + [b.storage_offset() for b in byte_rows]
    for size, dtype in _WORDS:
        if all(v % size == 0 for v in sizes):
            return [b.view(dtype) for b in byte_rows]
    raise AssertionError("unreachable: 1-byte words always fit")
