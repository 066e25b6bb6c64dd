"""Example inputs for converting a PyTorch file: from samples, from declared `input_shapes`, or from the archive;
and which axes become dynamic. No torch import: the API parses `input_shapes` at upload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import InvalidContent
from app.runtime.datatypes import V2_TO_NUMPY

EXAMPLE_ROWS = 2  # export traces with two rows, so the batch axis is never specialised to 1
# A dynamic axis named in input_shapes without a size gets this example size (the batch axis: EXAMPLE_ROWS).
DYNAMIC_EXAMPLE_SIZE = 8

InputShapes = dict[str, Any]


@dataclass
class InputSpec:
    name: str
    dims: list[int | str]  # ints: fixed sizes; strings: named dynamic axes
    dtype: np.dtype[Any] | None = None


def parse_input_shapes(raw: Any) -> InputShapes:
    """`{input: [dims]}` or `{input: {"shape": [dims], "dtype": "INT64"}}`; a dim is a size or an axis name;
    `{argument: {"value": 16000}}` fixes a Python scalar argument of forward()."""
    if not isinstance(raw, dict) or not raw:
        raise InvalidContent("'input_shapes' must be a JSON object {input name: [dims]}")
    parsed: InputShapes = {}
    for name, value in raw.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            scalar = value["value"]
            if not isinstance(scalar, int | float | bool):
                raise InvalidContent(f"'input_shapes' value of '{str(name)[:64]}' must be a number or a boolean")
            parsed[str(name)] = {"value": scalar}  # a Python scalar argument of forward(), fixed at this value
            continue
        shape, dtype = (value.get("shape"), value.get("dtype")) if isinstance(value, dict) else (value, None)
        if not isinstance(shape, list) or not shape or not all(
                (isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1_000_000)
                or (isinstance(d, str) and d.isidentifier()) for d in shape):
            raise InvalidContent(f"'input_shapes' for '{str(name)[:64]}' must be a list of positive sizes or axis "
                                 "names (a name makes that axis dynamic), e.g. [\"batch\", 128]")
        if dtype is not None and (not isinstance(dtype, str) or dtype.upper() not in V2_TO_NUMPY
                                  or dtype.upper() == "BYTES"):
            raise InvalidContent(f"'input_shapes' dtype of '{str(name)[:64]}' must be a V2 datatype such as FP32")
        parsed[str(name)] = {"shape": shape, "dtype": dtype.upper() if dtype else None}
    return parsed


def example_feeds(specs: list[InputSpec], samples: dict[str, np.ndarray] | None,
                   input_shapes: InputShapes | None, label: str,
                   fallback: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if samples is not None:
        missing = [n for n in names if n not in samples]
        if missing:
            raise InvalidContent(f"the samples have no array for input(s) {', '.join(missing)} of {label}; "
                                 f"name one array per input: {', '.join(names)}")
        return {n: np.ascontiguousarray(samples[n][:EXAMPLE_ROWS]) for n in names}
    if input_shapes is not None:
        unknown = sorted(set(input_shapes) - set(names))
        missing = [n for n in names if n not in input_shapes]
        if unknown or missing:
            raise InvalidContent(f"'input_shapes' must name exactly the inputs of {label}: {', '.join(names)}"
                                 + (f" (unknown: {', '.join(unknown)})" if unknown else "")
                                 + (f" (missing: {', '.join(missing)})" if missing else ""))
        rng = np.random.default_rng(0)
        feeds = {}
        for spec in specs:
            declared = input_shapes[spec.name]
            dtype = V2_TO_NUMPY[declared["dtype"]] if declared["dtype"] else (spec.dtype or np.dtype(np.float32))
            shape = [EXAMPLE_ROWS if axis == 0 and not isinstance(d, int) else
                     d if isinstance(d, int) else DYNAMIC_EXAMPLE_SIZE for axis, d in enumerate(declared["shape"])]
            feeds[spec.name] = _random(rng, dtype, shape)
        return feeds
    if fallback is not None and set(fallback) == set(names):
        return fallback
    raise InvalidContent(f"{label} needs example inputs: upload it with 'samples' or 'input_shapes'")


def _random(rng: np.random.Generator, dtype: np.dtype[Any], shape: list[int]) -> np.ndarray:
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    # 0 and 1 are valid for any embedding table or mask; samples give realistic values.
    return rng.integers(0, 2, shape).astype(dtype)


def named_axes(names: list[str], feeds: dict[str, np.ndarray],
                input_shapes: InputShapes | None) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names if feeds[n].ndim > 0}
    for name, declared in (input_shapes or {}).items():
        for axis, dim in enumerate(declared["shape"]):
            if isinstance(dim, str) and axis > 0:
                axes.setdefault(name, {})[axis] = dim
    return axes
