"""Minimal safetensors reader/writer that never maps or holds a whole file.

`safe_open` memory-maps each shard, so reading every tensor of a 140 GB checkpoint leaves 140 GB of
file pages counted against the process; `save_file` needs a whole shard in memory. Here a tensor
is read with one positioned read, and a shard is written from a plan (names, shapes, dtypes known
up front) with each tensor appended as it is produced. Same file format, so `safetensors` and
`transformers` read the output.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFormatError(ValueError):
    pass


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


class SafetensorsReader:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsFormatError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                raise SafetensorsFormatError(f"header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SafetensorsFormatError(f"header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (b, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsFormatError(f"bad header entry for {name}") from None
            if end - b != tensor_nbytes(shape, dtype) or b < 0:
                raise SafetensorsFormatError(f"tensor {name}: data size does not match its shape")
            if self.data_start + end > size:
                raise SafetensorsFormatError(f"tensor {name} runs past the end of the file (truncated?)")
            self.entries[name] = (dtype, shape, b, end)

    def keys(self):
        return list(self.entries)

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def dtype(self, name) -> torch.dtype:
        return self.entries[name][0]

    def get(self, name) -> torch.Tensor:
        dtype, shape, b, end = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.data_start + b)
            buf = bytearray(f.read(end - b))
        if len(buf) != end - b:
            raise SafetensorsFormatError(f"tensor {name}: short read (truncated file?)")
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors (names, shapes, dtypes, order) are planned up front."""

    def __init__(self, path: str | Path, plan: list[tuple[str, tuple, torch.dtype]], metadata: dict | None = None):
        self.path = Path(path)
        header, offset = {}, 0
        for name, shape, dtype in plan:
            nbytes = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected = [(n, tuple(s), d) for n, s, d in plan]
        self.pos = 0
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.pos]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != want:
            raise ValueError(f"{self.path}: expected {want}, got {got}")
        self.f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.pos += 1

    def close(self) -> None:
        if self.pos != len(self.expected):
            raise ValueError(f"{self.path}: {len(self.expected) - self.pos} planned tensors never written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
