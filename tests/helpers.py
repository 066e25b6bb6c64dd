"""Small ONNX models and request builders shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
MLP = MODELS / "digits_mlp.onnx"
MLP_SAMPLES = MODELS / "digits_mlp.samples.npz"
CNN = MODELS / "digits_cnn.onnx"
CNN_SAMPLES = MODELS / "digits_cnn.samples.npz"
TRANSFORMER = MODELS / "tiny_transformer.onnx"
TRANSFORMER_SAMPLES = MODELS / "tiny_transformer.samples.npz"

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def convolutions_only(path: Path) -> Path:
    """One Conv with a constant weight: a model int4 (MatMul-only) has nothing to do with."""
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def identity_model(datatype: str, shape: list[int | str] | None = None) -> bytes:
    """x -> y of one datatype, for codec round trips."""
    shape = ["batch", 3] if shape is None else shape
    elem = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", elem, shape)], [helper.make_tensor_value_info("y", elem, shape)],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def odd_names_model() -> bytes:
    """Inputs named with '/', ':' and '.', a scalar input and a dynamic middle dimension."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["enc/in:0", "scale.factor"], ["out/y:0"])], "odd",
        [
            helper.make_tensor_value_info("enc/in:0", TensorProto.FLOAT, [2, "seq", 4]),
            helper.make_tensor_value_info("scale.factor", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("out/y:0", TensorProto.FLOAT, [2, "seq", 4])],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def fails_on_zeros_model() -> bytes:
    """Range(0, 10, step): a step of zero (what an all-zero test input gives) is an error."""
    graph = helper.make_graph(
        [helper.make_node("Range", ["zero", "ten", "step"], ["r"])],
        "needs-data",
        [helper.make_tensor_value_info("step", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("r", TensorProto.INT64, ["k"])],
        initializer=[
            helper.make_tensor("zero", TensorProto.INT64, [], [0]),
            helper.make_tensor("ten", TensorProto.INT64, [], [10]),
        ],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def external_data_model(location: str) -> bytes:
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    entry = weights.external_data.add()
    entry.key, entry.value = "location", location
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], initializer=[weights],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def spin_model() -> bytes:
    """A Loop whose trip count is an input: a tiny request can ask for hours of work."""
    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "start"], ["total"], body=body)], "spin",
        [helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
                     helper.make_tensor("start", TensorProto.FLOAT, [1], [0.0])],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def recursive_function_model() -> bytes:
    """Two model-local functions that call each other: an expander following them would never stop."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]
    ping = helper.make_function("custom", "Ping", ["x"], ["y"],
                                [helper.make_node("Pong", ["x"], ["y"], domain="custom")], opsets)
    pong = helper.make_function("custom", "Pong", ["x"], ["y"],
                                [helper.make_node("Ping", ["x"], ["y"], domain="custom")], opsets)
    graph = helper.make_graph(
        [helper.make_node("Ping", ["x"], ["y"], domain="custom")], "recursive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return _serialize(helper.make_model(graph, functions=[ping, pong], opset_imports=opsets))


def allocating_model() -> bytes:
    """Range(0, n): a scalar input decides how much memory the answer takes."""
    graph = helper.make_graph(
        [helper.make_node("Range", ["zero", "n", "one"], ["r"]),
         helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0)],
        "alloc", [helper.make_tensor_value_info("n", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def tensor_bomb_model() -> bytes:
    """A 100-byte file declaring a 160 GB initializer: whatever reads the declared size first must not trust it."""
    weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[200_000, 200_000], raw_data=b"\0" * 16)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "bomb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [200_000, 200_000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [200_000, 200_000])], initializer=[weights],
    )
    return _serialize(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def unknown_op_model(domain: str) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("FrobnicateTensor", ["x"], ["y"], domain=domain)], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return _serialize(helper.make_model(graph, opset_imports=opsets))


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _serialize(model: onnx.ModelProto) -> bytes:
    model.ir_version = 8
    return bytes(model.SerializeToString())
