"""ONNX graph -> trainable torch module, and trained weights -> the same ONNX graph.

`OnnxModule` interprets the graph node by node with torch ops (no onnx2torch: it needs torchvision, which would
pull another torch build). Float initializers in weight positions (Conv/Gemm/MatMul weights and biases,
normalization scales and shifts, embedding tables, per-channel Add/Mul/Sub constants) become `nn.Parameter`s;
everything else (shape constants, scalars, BatchNorm running statistics, Constant nodes) stays a frozen buffer.
Half-precision graphs (float16/bfloat16) run and train in float32, so their outputs come back as float32.

`write_back` is the export: it copies the original graph and replaces only the trained initializers' values, so
the structure, names, dtypes and shapes are exactly those of the input model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from app.compression.distill.bridge import coverage, indexing, recurrent, resize
from app.compression.distill.bridge.coverage import Node, attribute_value, make_node, opset_of
from app.compression.distill.bridge.ms_ops import MS_OPS
from app.compression.distill.bridge.nn_ops import NN_OPS
from app.compression.distill.bridge.ops import OPS, TORCH_DTYPES, OpFn, Tensor, compute_dtype
from app.compression.distill.bridge.quant_ops import QUANT_OPS
from app.compression.errors import UnsupportedModel

assert indexing and recurrent and resize  # imported for the ops they register in OPS
_ALL_OPS: dict[str, OpFn] = {**OPS, **NN_OPS, **MS_OPS, **QUANT_OPS}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
# (op type -> input positions that hold weights); elementwise ones count only for non-scalar constants
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Einsum": tuple(range(8)),
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "Gather": (0,), "PRelu": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
    "com.microsoft.FusedConv": (1, 2), "com.microsoft.FusedGemm": (0, 1, 2), "com.microsoft.FusedMatMul": (0, 1),
    "com.microsoft.SkipLayerNormalization": (2, 3, 4), "LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
    "GroupNormalization": (1, 2), "SimplifiedLayerNormalization": (1,), "com.microsoft.Attention": (1, 2),
    "com.microsoft.BiasGelu": (1,), "com.microsoft.FastGelu": (1,), "QuantizeLinear": (0,),
    "com.microsoft.EmbedLayerNormalization": (2, 3, 4, 5, 6), "com.microsoft.SkipSimplifiedLayerNormalization": (2, 3),
}
_ELEMENTWISE = ("Add", "Sub", "Mul")


def supported_ops() -> frozenset[str]:
    """Op types the bridge can run: bare default-domain names, and `com.microsoft.X` for onnxruntime fusions."""
    return frozenset(_ALL_OPS) | {"Constant"}


class OnnxModule(nn.Module):
    """A trainable interpreter of one ONNX graph; outputs come back in graph-output order.

    `trainable` overrides which initializers become parameters (names of float initializers).
    """

    def __init__(self, model: onnx.ModelProto, trainable: Collection[str] | None = None) -> None:
        super().__init__()
        graph = model.graph
        opset = opset_of(model)
        _check_supported(model)
        initializers = {t.name for t in graph.initializer}
        self.input_names: list[str] = [v.name for v in graph.input if v.name not in initializers]
        self.output_names: list[str] = [v.name for v in graph.output]
        chosen = set(trainable) if trainable is not None else _weight_initializers(graph)
        self._slots: dict[str, str] = {}  # ONNX value name -> attribute holding it
        self._trained: dict[str, str] = {}  # initializer name -> parameter attribute
        used: set[str] = set()
        for tensor in graph.initializer:
            value = _tensor_to_torch(tensor)
            attr = _attribute_name(tensor.name, used)
            if tensor.name in chosen and tensor.data_type in _FLOAT_TYPES:
                self.register_parameter(attr, nn.Parameter(value))  # write_back rounds to the stored dtype
                self._trained[tensor.name] = attr
            else:
                self.register_buffer(attr, value)
            self._slots[tensor.name] = attr
        self._nodes: list[Node] = []
        for node in _topological(graph, set(self.input_names) | initializers):
            attrs = {a.name: attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant":
                attr = _attribute_name(node.output[0], used)
                self.register_buffer(attr, _constant(attrs))
                self._slots[node.output[0]] = attr
                continue
            self._nodes.append(make_node(node, opset))
        self._release = _last_uses(self._nodes)

    # -- introspection ---------------------------------------------------------------------------------------------

    def onnx_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors by initializer name (gradients land here after backward)."""
        return {name: getattr(self, attr) for name, attr in self._trained.items()}

    def parameter(self, initializer: str) -> nn.Parameter:
        return self.onnx_parameters()[initializer]

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self._nodes:
            counts[node.key] = counts.get(node.key, 0) + 1
        return dict(sorted(counts.items()))

    # -- execution -------------------------------------------------------------------------------------------------

    def forward(self, *inputs: Any) -> tuple[Tensor, ...]:
        """Graph inputs positionally (in graph order) or one mapping of name -> tensor/array."""
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            feeds = dict(inputs[0])
        else:
            if len(inputs) != len(self.input_names):
                raise ValueError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), "
                                 f"got {len(inputs)}")
            feeds = dict(zip(self.input_names, inputs, strict=True))
        values = self.evaluate(feeds, self.output_names)
        return tuple(values[name] for name in self.output_names)

    def evaluate(self, feeds: Mapping[str, Any], names: Sequence[str]) -> dict[str, Tensor]:
        """Any values of the graph by name (intermediate activations too, e.g. for Taylor importance)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ValueError(f"missing input(s): {', '.join(missing)}")
        device = next(iter(self.buffers()), next(iter(self.parameters()), torch.empty(0))).device
        env: dict[str, Tensor] = {name: _as_tensor(feeds[name], device) for name in self.input_names}
        keep = set(names)
        for index, node in enumerate(self._nodes):
            args = [None if not name else self._lookup(env, name) for name in node.inputs]
            try:
                results = _ALL_OPS[node.key](node, args)
            except Exception as exc:
                raise UnsupportedModel(f"the training bridge could not run {node.key} node "
                                       f"'{node.name or node.outputs[0]}': {str(exc)[:300]}") from exc
            for name, value in zip(node.outputs, results, strict=False):
                if name:
                    env[name] = value
            for name in self._release[index]:
                if name not in keep:
                    env.pop(name, None)  # free activations early: peak memory stays near one layer's
        return {name: self._lookup(env, name) for name in names}

    def _lookup(self, env: dict[str, Tensor], name: str) -> Tensor:
        if name in env:
            return env[name]
        attr = self._slots.get(name)
        if attr is None:
            raise ValueError(f"value '{name}' is not produced by the graph")
        value: Tensor = getattr(self, attr)
        return value


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of `model` whose trained initializers hold the module's values; everything else is untouched."""
    trained = {name: p.detach().cpu() for name, p in module.onnx_parameters().items()}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    found = set()
    for tensor in result.graph.initializer:
        value = trained.get(tensor.name)
        if value is None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        array = value.to(torch.float64 if dtype == np.float64 else torch.float32).numpy().astype(dtype)
        if array.shape != tuple(tensor.dims):
            raise ValueError(f"parameter '{tensor.name}' has shape {array.shape}, the initializer {tuple(tensor.dims)}")
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        found.add(tensor.name)
    if found != set(trained):
        raise ValueError(f"the module has parameters the model lacks: {', '.join(sorted(set(trained) - found))}")
    return result


# ---- building ----------------------------------------------------------------------------------------------------

def _check_supported(model: onnx.ModelProto) -> None:
    """Raise once, naming every op type (or op configuration) the bridge cannot run."""
    missing = coverage.unsupported(model)
    if missing:
        raise UnsupportedModel("the model uses operators the training bridge cannot run: " + ", ".join(missing))


def _weight_initializers(graph: onnx.GraphProto) -> set[str]:
    """Float initializers used only in weight positions; any other use (a shape, a scalar) freezes them."""
    floats = {t.name: t for t in graph.initializer if t.data_type in _FLOAT_TYPES}
    chosen: set[str] = set()
    frozen: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        for position, name in enumerate(node.input):
            tensor = floats.get(name)
            if tensor is None:
                continue
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            weight = position in _WEIGHT_INPUTS.get(key, ())
            if node.op_type in _ELEMENTWISE and int(np.prod(tensor.dims)) <= 1:
                weight = False  # scalar constants (attention scale, GELU's sqrt(2)) are not learned
            (chosen if weight else frozen).add(name)
    # a mask of -inf or a NaN would poison Adam's moments
    finite = {n for n in chosen - frozen if np.isfinite(numpy_helper.to_array(floats[n]).astype(np.float64)).all()}
    return finite


def _topological(graph: onnx.GraphProto, available: set[str]) -> list[onnx.NodeProto]:
    """ONNX requires sorted nodes, but some exporters get it wrong; Kahn's order fixes that cheaply."""
    ready = set(available) | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        remaining = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            absent = sorted({n for node in remaining for n in node.input if n not in ready})
            raise UnsupportedModel(f"the graph uses values nothing produces: {', '.join(absent[:5])}")
        pending = remaining
    return ordered


def _last_uses(nodes: list[Node]) -> list[list[str]]:
    last: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.inputs:
            last[name] = index
    release: list[list[str]] = [[] for _ in nodes]
    for name, index in last.items():
        release[index].append(name)
    return release


def _attribute_name(name: str, used: set[str]) -> str:
    """A module attribute for an ONNX name ('.' and '/' are not allowed in parameter names)."""
    base = "v_" + re.sub(r"\W", "_", name)
    attr, suffix = base, 1
    while attr in used:
        attr, suffix = f"{base}_{suffix}", suffix + 1
    used.add(attr)
    return attr


def _tensor_to_torch(tensor: TensorProto) -> Tensor:
    return _array_to_torch(numpy_helper.to_array(tensor), TORCH_DTYPES[tensor.data_type])


def _array_to_torch(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A writable copy (onnx arrays can be read-only views); half precision widens exactly to float32."""
    if compute_dtype(dtype) != dtype:
        return torch.from_numpy(np.array(array, dtype=np.float32))
    return torch.from_numpy(np.array(array, copy=True))


def _constant(attrs: dict[str, Any]) -> Tensor:
    if "value" in attrs:
        array = np.asarray(attrs["value"])
        for onnx_type, torch_type in TORCH_DTYPES.items():
            if helper.tensor_dtype_to_np_dtype(onnx_type) == array.dtype:
                return _array_to_torch(array, torch_type)
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return torch.from_numpy(np.array(attrs[key], dtype=dtype))
    raise UnsupportedModel(f"a Constant holding {', '.join(attrs) or 'nothing'} is not supported by the training "
                           "bridge")


def _as_tensor(value: Any, device: torch.device) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.array(value, copy=True))
    return tensor.to(device=device, dtype=compute_dtype(tensor.dtype))

