"""The Triton backend of the compaction ops, with the interface of the C++ ops (torch.ops.earlyexit_C).

compact(keep, srcs) -> [packed..., index]; partition_rows(keep, srcs, dsts) -> (perm, count);
scatter_rows(dest, index, src). Inputs are validated, keep is a contiguous bool [N], every tensor has
dense rows. The kernels move machine words, so tensors go in as word views (earlyexit.ops.rows).
Imported only when the Triton backend runs: Triton is optional on a CPU-only install.
"""

import torch

from earlyexit.ops.rows import as_words
from earlyexit.triton_kernels.compaction import compaction_triton, scatter_rows_triton


def _launch(keep, srcs, dsts, index, count, partition):
    pairs = [as_words(s, d) for s, d in zip(srcs, dsts)]
    interpret = keep.device.type == "cpu"  # the interpreter lane of the tests
    compaction_triton(
        keep.view(torch.uint8), [p[0] for p in pairs], [p[1] for p in pairs], index, count, partition, interpret
    )


def compact(keep, srcs):
    # The one host synchronization: K sizes the outputs (free when keep is on the CPU).
    k = int(torch.count_nonzero(keep))
    packed = [torch.empty((k, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in srcs]
    index = torch.empty(k, dtype=torch.int64, device=keep.device)
    _launch(keep, srcs, packed, index, None, False)
    return packed + [index]


def partition_rows(keep, srcs, dsts):
    perm = torch.empty(keep.shape, dtype=torch.int64, device=keep.device)
    count = torch.empty((), dtype=torch.int64, device=keep.device)
    _launch(keep, srcs, dsts, perm, count, True)
    return perm, count


def scatter_rows(dest, index, src):
    dest_words, src_words = as_words(dest, src)
    scatter_rows_triton(dest_words, index, src_words, interpret=dest.device.type == "cpu")
