from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from app.compression.data import ModelData
from app.compression.distill.bridge import OnnxModule, supported_ops, write_back
from app.compression.errors import UnsupportedModel
from app.compression.graph import session
from tests.helpers import CNN, MLP, TRANSFORMER

RNG = np.random.default_rng(0)


def _reference(path: Path | bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o) for o in session(path).run(None, feeds)]


def _module_outputs(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in module(feeds)]


@pytest.mark.parametrize("path,data", [(CNN, "cnn_data"), (MLP, "mlp_data"), (TRANSFORMER, "transformer_data")])
def test_example_models_match_onnxruntime(path: Path, data: str, request: pytest.FixtureRequest) -> None:
    samples: ModelData = request.getfixturevalue(data)
    feeds = samples.take(128).inputs
    module = OnnxModule(onnx.load(str(path)))
    for got, want in zip(_module_outputs(module, feeds), _reference(path, feeds), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", [CNN, MLP, TRANSFORMER])
def test_write_back_of_an_untouched_module_reproduces_the_model(path: Path) -> None:
    model = onnx.load(str(path))
    result = write_back(model, OnnxModule(model))
    assert [n.SerializeToString() for n in result.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [t.name for t in result.graph.initializer] == [t.name for t in model.graph.initializer]
    for got, want in zip(result.graph.initializer, model.graph.initializer, strict=True):
        assert (got.data_type, list(got.dims)) == (want.data_type, list(want.dims))
        assert numpy_helper.to_array(got).tobytes() == numpy_helper.to_array(want).tobytes()


def test_weights_are_parameters_and_constants_are_frozen_buffers() -> None:
    cnn = OnnxModule(onnx.load(str(CNN)))
    assert {"features.0.weight", "features.1.weight", "features.1.bias", "classifier.1.weight"} <= set(
        cnn.onnx_parameters())
    assert not {"features.1.running_mean", "features.1.running_var", "val_53"} & set(cnn.onnx_parameters())
    transformer = OnnxModule(onnx.load(str(TRANSFORMER)))
    params = set(transformer.onnx_parameters())
    assert {"tok.weight", "pos.weight", "layers.0.ln1.weight", "layers.0.attn.qkv.weight.T",
            "layers.0.attn.qkv.bias", "head.weight"} <= params
    assert not {"val_47", "val_49", "val_61"} & params  # attention scale, mask fill, GELU constant


def test_gradients_reach_conv_and_gemm_weights(cnn_data: ModelData) -> None:
    module = OnnxModule(onnx.load(str(CNN)))
    (logits,) = module(cnn_data.take(32).inputs)
    labels = torch.from_numpy(np.asarray(cnn_data.labels)[:32])
    torch.autograd.backward(torch.nn.functional.cross_entropy(logits, labels))
    for name in ("features.0.weight", "features.6.conv2.weight", "features.1.weight", "classifier.1.weight",
                 "classifier.3.bias"):
        grad = module.parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_gradients_reach_the_embedding_table(transformer_data: ModelData) -> None:
    module = OnnxModule(onnx.load(str(TRANSFORMER)))
    (embedding,) = module(transformer_data.take(8).inputs)
    torch.autograd.backward(embedding.pow(2).sum())
    for name in ("tok.weight", "layers.1.ffn.2.weight.T", "ln_f.weight"):
        grad = module.parameter(name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_trained_weights_are_written_back_and_onnxruntime_agrees(mlp_data: ModelData) -> None:
    model = onnx.load(str(MLP))
    module = OnnxModule(model)
    with torch.no_grad():
        module.parameter("net.2.weight").mul_(0.5)
    result = write_back(model, module)
    feeds = mlp_data.take(16).inputs
    np.testing.assert_allclose(_reference(result.SerializeToString(), feeds)[0], _module_outputs(module, feeds)[0],
                               atol=1e-5)
    original = numpy_helper.to_array(model.graph.initializer[2])
    assert np.array_equal(numpy_helper.to_array(result.graph.initializer[2]), original * _s(0.5))


def test_positional_and_intermediate_values(mlp_data: ModelData) -> None:
    module = OnnxModule(onnx.load(str(MLP)))
    x = mlp_data.inputs["input"][:4]
    with torch.no_grad():
        (positional,) = module(torch.from_numpy(x))
        values = module.evaluate({"input": x}, ["relu", "logits"])
    assert torch.equal(positional, values["logits"])
    assert values["relu"].shape == (4, 128)
    assert module.op_counts() == {"Gemm": 3, "Relu": 2}


@pytest.mark.parametrize("path,data", [(CNN, "cnn_data"), (MLP, "mlp_data"), (TRANSFORMER, "transformer_data")])
def test_onnxruntime_fusions_of_the_optimize_step_run_and_train(path: Path, data: str, tmp_path: Path,
                                                                request: pytest.FixtureRequest) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert any(n.domain == "com.microsoft" for n in optimized.graph.node)
    feeds = request.getfixturevalue(data).take(64).inputs
    module = OnnxModule(optimized)
    for got, want in zip(_module_outputs(module, feeds), _reference(tmp_path / "optimized.onnx", feeds), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    weight_at = {"FusedConv": 1, "FusedGemm": 1, "SkipLayerNormalization": 2}
    fused = [n.input[weight_at[n.op_type]] for n in optimized.graph.node if n.op_type in weight_at]
    assert fused and set(fused) <= set(module.onnx_parameters())


def test_half_precision_weights_run_in_float32_and_round_trip(mlp_data: ModelData) -> None:
    model = onnx.load(str(MLP))
    del model.graph.value_info[:]
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for node in model.graph.node:  # float32 interface around a float16 body
        node.input[:] = ["half" if i == "input" else i for i in node.input]
        node.output[:] = ["half_logits" if o == "logits" else o for o in node.output]
    model.graph.node.insert(0, helper.make_node("Cast", ["input"], ["half"], to=TensorProto.FLOAT16))
    model.graph.node.append(helper.make_node("Cast", ["half_logits"], ["logits"], to=TensorProto.FLOAT))
    module = OnnxModule(model)
    assert module.parameter("net.0.weight").dtype == torch.float32
    feeds = mlp_data.take(32).inputs
    np.testing.assert_allclose(_module_outputs(module, feeds)[0], _reference(model.SerializeToString(), feeds)[0],
                               atol=2e-2, rtol=1e-2)
    for got, want in zip(write_back(model, module).graph.initializer, model.graph.initializer, strict=True):
        assert got.data_type == TensorProto.FLOAT16
        assert numpy_helper.to_array(got).tobytes() == numpy_helper.to_array(want).tobytes()


def test_unsupported_ops_are_all_named_at_once() -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("QLinearMatMulish", ["b"], ["c"], domain="com.example")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    with pytest.raises(UnsupportedModel, match=r"Frobnicate, com\.example\.QLinearMatMulish"):
        OnnxModule(model)


def test_supported_ops_cover_the_example_models() -> None:
    for path in (CNN, MLP, TRANSFORMER):
        assert {n.op_type for n in onnx.load(str(path)).graph.node} <= supported_ops()


# ---- one graph per operator, compared with onnxruntime -------------------------------------------------------------

def _f(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _s(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _i(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def _case(op: str, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None, opset: int = 18,
          outputs: int = 1, **attrs: Any) -> Any:
    return pytest.param(op, feeds, consts or {}, opset, outputs, attrs, id=f"{op}-{len(attrs)}-{opset}")


X4 = {"x": _f(2, 3, 5, 6)}
X3 = {"x": _f(2, 3, 4)}
X2 = {"x": _f(4, 6)}
CASES = [
    *[_case(op, X3) for op in ("Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Abs", "HardSwish", "Softplus",
                              "Softsign", "Identity", "Floor", "Ceil", "Sign")],
    _case("Sqrt", {"x": np.abs(_f(3, 4))}), _case("Log", {"x": np.abs(_f(3, 4)) + 0.1}),
    _case("Reciprocal", {"x": np.abs(_f(3, 4)) + 0.5}),
    _case("LeakyRelu", X3, alpha=0.1), _case("Elu", X3, alpha=0.7), _case("Selu", X3),
    _case("HardSigmoid", X3, alpha=0.3, beta=0.4), _case("PRelu", X4, {"slope": _f(3, 1, 1)}),
    _case("Gelu", X3, opset=20), _case("Gelu", X3, opset=20, approximate="tanh"),
    _case("Softmax", X3, opset=11), _case("Softmax", X3, axis=1), _case("LogSoftmax", X3),
    _case("Add", X3, {"b": _f(4)}), _case("Sub", X3, {"b": _f(3, 1)}), _case("Mul", X3, {"b": _f(1, 3, 1)}),
    _case("Div", X3, {"b": np.abs(_f(4)) + 0.5}), _case("Div", {"x": _i(7, -7, 9)}, {"b": _i(2, 2, -4)}),
    _case("Pow", {"x": np.abs(_f(3, 4)) + 0.1}, {"b": np.array(1.5, np.float32)}),
    _case("Gemm", {"x": _f(5, 4)}, {"w": _f(3, 5), "c": _f(3)}, alpha=0.5, beta=2.0, transA=1, transB=1),
    _case("MatMul", X3, {"w": _f(4, 5)}), _case("MatMul", {"x": _f(2, 2, 3, 4)}, {"w": _f(2, 1, 4, 2)}),
    _case("Flatten", X4, axis=2), _case("Flatten", X4, axis=0),
    _case("Reshape", X4, {"s": _i(0, -1, 6)}), _case("Reshape", X4, {"s": _i(2, 0, 30)}, allowzero=0),
    _case("Transpose", X4, perm=[0, 2, 3, 1]), _case("Transpose", X3),
    _case("Squeeze", {"x": _f(1, 3, 1, 2)}, {"a": _i(-2)}), _case("Squeeze", {"x": _f(1, 3, 1)}, opset=11),
    _case("Unsqueeze", X3, {"a": _i(0, -1)}), _case("Unsqueeze", X3, opset=11, axes=[1]),
    _case("Concat", X3, {"b": _f(2, 1, 4)}, axis=1),
    _case("Split", {"x": _f(2, 7)}, {"s": _i(3, 4)}, outputs=2, axis=1),
    _case("Split", {"x": _f(7, 2)}, outputs=3, num_outputs=3),
    _case("Slice", {"x": _f(6, 7)}, {"s": _i(5, 1), "e": _i(-100, 6), "a": _i(0, 1), "t": _i(-2, 2)}),
    _case("Slice", {"x": _f(6, 7)}, {"s": _i(1), "e": _i(2**62), "a": _i(-1)}),
    _case("Slice", {"x": _f(6, 7)}, opset=9, starts=[-3], ends=[100], axes=[0]),
    _case("Gather", X3, {"i": np.array([[0, -1], [2, 1]], np.int64)}, axis=1),
    _case("Gather", X3, {"i": np.array(1, np.int64)}, axis=0),
    _case("GatherElements", {"x": _f(3, 4)}, {"i": np.array([[0, 3], [1, -1], [2, 2]], np.int64)}, axis=1),
    _case("Shape", X4, start=1, end=-1), _case("Size", X4),
    _case("ConstantOfShape", {"x": _i(2, 3)}, value=numpy_helper.from_array(np.array([1.5], np.float32))),
    _case("Cast", X3, to=TensorProto.INT64), _case("CastLike", X3, {"b": _i(1)}),
    _case("Dropout", X3, outputs=2),
    _case("MaxPool", X4, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1),
    _case("MaxPool", X4, kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
    _case("AveragePool", X4, kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 0, 1]),
    _case("AveragePool", X4, kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    _case("AveragePool", X4, kernel_shape=[2, 2], strides=[2, 2]),
    _case("AveragePool", X4, kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
    _case("MaxPool", {"x": _f(1, 2, 5, 5)}, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    _case("GlobalAveragePool", X4), _case("GlobalMaxPool", X4),
    _case("ReduceMean", X3, opset=13, axes=[1], keepdims=0), _case("ReduceMean", X3, {"a": _i(-1, 0)}),
    _case("ReduceSum", X3, {"a": _i(1)}, keepdims=0), _case("ReduceSum", X3), _case("ReduceMax", X3, {"a": _i(2)}),
    _case("ReduceMin", X3, opset=13, axes=[0, 2]), _case("ReduceProd", X3, {"a": _i(1, 2)}, keepdims=0),
    _case("ReduceL2", X3, {"a": _i(2)}), _case("ReduceSumSquare", X3), _case("ReduceLogSumExp", X3, {"a": _i(1)}),
    _case("ReduceSum", X3, {"a": np.zeros(0, np.int64)}, noop_with_empty_axes=1),
    _case("LayerNormalization", X3, {"s": _f(4), "b": _f(4)}, epsilon=1e-3),
    _case("LayerNormalization", X3, {"s": _f(3, 4)}, axis=-2),
    _case("BatchNormalization", X4, {"s": _f(3), "b": _f(3), "m": _f(3), "v": np.abs(_f(3)) + 0.1}),
    _case("InstanceNormalization", X4, {"s": _f(3), "b": _f(3)}),
    _case("Where", {"c": RNG.random((3, 4)) > 0.5, "x": _f(2, 3, 4)}, {"y": _s(-1.0)}),
    _case("Equal", {"x": _i(1, 2, 3)}, {"b": _i(1, 0, 3)}), _case("Greater", X3, {"b": _s(0.0)}),
    _case("Expand", {"x": _f(3, 1)}, {"s": _i(2, 1, 4)}), _case("Tile", X3, {"r": _i(1, 2, 1)}),
    _case("Clip", X3, {"lo": _s(-0.5), "hi": _s(0.5)}), _case("Clip", X3, {"lo": _s(0)}),
    _case("Clip", X3, opset=6, min=-0.2, max=0.3),
    _case("Min", X3, {"b": _f(4), "c": _f(3, 1)}), _case("Max", X3, {"b": _f(4)}), _case("Sum", X3, {"b": _f(4)}),
    _case("Mean", X3, {"b": _f(4)}),
    _case("Conv", X4, {"w": _f(4, 3, 3, 2), "b": _f(4)}, pads=[1, 0, 0, 1], strides=[2, 1], dilations=[1, 2]),
    _case("Conv", {"x": _f(2, 4, 5, 5)}, {"w": _f(4, 2, 3, 3)}, group=2, auto_pad="SAME_UPPER", strides=[2, 2]),
    _case("Conv", {"x": _f(2, 3, 9)}, {"w": _f(5, 3, 3)}, pads=[1, 1]),
    _case("ConvTranspose", X4, {"w": _f(3, 2, 3, 3), "b": _f(2)}, strides=[2, 2], pads=[1, 0, 0, 1],
          output_padding=[1, 0]),
    _case("ConvTranspose", X4, {"w": _f(3, 4, 2, 2)}, strides=[2, 2], output_shape=[11, 12]),
    _case("Range", {"x": np.array(1, np.int64)}, {"l": np.array(9, np.int64), "d": np.array(3, np.int64)}),
    _case("ArgMax", X3, axis=1, keepdims=0), _case("ArgMin", {"x": _i(3, 1, 1, 2)}, select_last_index=1),
    _case("Pad", X3, {"p": _i(0, 1, 2, 0, 0, 1), "v": _s(0.5)}),
    _case("Pad", X4, {"p": _i(0, 0, 1, 2, 0, 0, 2, 1)}, mode="reflect"),
    _case("Einsum", X3, {"b": _f(4, 5)}, equation="bij,jk->bik"),
]


@pytest.mark.parametrize("op,feeds,consts,opset,outputs,attrs", CASES)
def test_operator_matches_onnxruntime(op: str, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray],
                                      opset: int, outputs: int, attrs: dict[str, Any]) -> None:
    names = [f"y{i}" for i in range(outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, [*feeds, *consts], names, **attrs)], "single",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in feeds.items()],
        [onnx.ValueInfoProto(name=n) for n in names],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    want = _reference(model.SerializeToString(), feeds)
    got = _module_outputs(OnnxModule(model), feeds)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
