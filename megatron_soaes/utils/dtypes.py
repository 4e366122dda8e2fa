"""Dtype names: the one table between config strings ("bf16"), torch dtypes and HF's names."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPE_CHOICES = tuple(DTYPES)


def torch_dtype(name: str) -> torch.dtype:
    """"bf16" -> torch.bfloat16; a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16"."""
    return {v: k for k, v in DTYPES.items()}[dtype]
