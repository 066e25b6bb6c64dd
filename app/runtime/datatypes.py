"""Tensor datatypes: Open Inference Protocol names, numpy dtypes and onnxruntime type strings."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# V2 name -> numpy dtype; BYTES tensors travel as numpy object arrays of bytes/str.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

NUMPY_TO_V2: dict[np.dtype, str] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

# Bytes per element in the binary tensor extension (BYTES is length-prefixed, so it has none).
ELEMENT_SIZE: dict[str, int] = {
    name: dtype.itemsize for name, dtype in V2_TO_NUMPY.items() if name != "BYTES"
}


def v2_datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[array.dtype]
    except KeyError:
        raise TypeError(f"no Open Inference Protocol datatype for numpy {array.dtype}") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as clients see it: -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dim_names: tuple[str | None, ...] = field(default=(), compare=False)

    @property
    def numpy_dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    @property
    def has_dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] == -1

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TensorSpec:
        shape = tuple(int(d) for d in data["shape"])  # type: ignore[attr-defined]
        return cls(name=str(data["name"]), datatype=str(data["datatype"]), shape=shape)
