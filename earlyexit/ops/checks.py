"""Argument checks shared by the ops: each raises ValueError naming the argument."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def check_float_dtype(name, x, allowed=FLOAT_DTYPES):
    check_dtype(name, x, allowed)


def check_same_device(reference_name, reference, **tensors):
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (like {reference_name}), got {x.device}")


def check_shape(name, x, expected):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(x.shape)}")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_dtype(name, x, allowed):
    if x.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ValueError(f"{name}: expected dtype {names}, got {dtype_name(x.dtype)}")


def check_dim(name, x, dim):
    if x.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got {x.dim()}-D shape {tuple(x.shape)}")


def check_rows(name, x, n, what):
    """x is a tensor of >= 1 dims whose dim 0 has length n (``what`` says where n comes from)."""
    if x.dim() < 1:
        raise ValueError(f"{name}: expected a tensor with {n} rows in dim 0 ({what}), got a 0-d tensor")
    if x.shape[0] != n:
        raise ValueError(f"{name}: expected {n} rows in dim 0 ({what}), got shape {tuple(x.shape)}")
