"""GPTQ's MatMulNBits as onnxruntime runs it: the stored integers and scales compute what `dequantize` says, and on
activations with correlated, uneven channels (as a transformer's are) the layer's output error is well below
onnxruntime's own round-to-nearest at the same bits and block size."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.compression.llm.gptq import dequantize, matmul_nbits, quantize_weight


def _activations(rng: np.random.Generator, tokens: int, k: int, seed: int = 0) -> np.ndarray:
    """Tokens of one distribution per (k, seed): mixed channels, a few of them loud."""
    shape = np.random.default_rng(seed)
    mixing = shape.normal(size=(k, k)) / np.sqrt(k)
    loud = np.ones(k)
    loud[shape.choice(k, 4, replace=False)] = 12.0
    tokens_out: np.ndarray = (rng.normal(size=(tokens, k)) @ mixing + 0.5 * rng.normal(size=(tokens, k))) * loud
    return tokens_out


def _matmul_model(k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="layer/MatMul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", n])],
                              [numpy_helper.from_array(weight, "w")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x.astype(np.float32)})[0])


def _gptq_model(weight: np.ndarray, x: np.ndarray, bits: int, block_size: int) -> tuple[onnx.ModelProto, np.ndarray]:
    k, n = weight.shape
    packed, scales = quantize_weight(weight, x.T.astype(np.float64) @ x, bits=bits, block_size=block_size)
    model = _matmul_model(k, n, weight)
    replacement, tensors = matmul_nbits(model.graph.node[0], packed, scales, k=k, n=n, bits=bits,
                                        block_size=block_size)
    del model.graph.node[:]
    del model.graph.initializer[:]
    model.graph.node.append(replacement)
    model.graph.initializer.extend(tensors)
    return model, dequantize(packed, scales, bits=bits, k=k)


@pytest.mark.parametrize(("bits", "block_size", "k"), [(4, 32, 96), (4, 16, 64), (8, 32, 64), (4, 32, 80)])
def test_onnxruntime_computes_the_dequantized_weight(bits: int, block_size: int, k: int) -> None:
    rng = np.random.default_rng(bits + block_size + k)
    weight = rng.normal(size=(k, 24)).astype(np.float32)
    x = _activations(rng, 200, k)
    model, dequantized = _gptq_model(weight, x, bits, block_size)
    np.testing.assert_allclose(_run(model, x), x.astype(np.float32) @ dequantized, rtol=1e-4, atol=1e-3)
    levels = np.unique(np.round(dequantized[:block_size, 0] / np.abs(dequantized[:block_size, 0]).max() * 8))
    assert len(levels) <= 2 ** bits  # really `bits` bits per weight
    assert np.abs(dequantized - weight).max() < np.abs(weight).max() / 2  # and close to the weight


def test_the_layer_output_error_is_well_below_round_to_nearest() -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(7)
    k, n = 128, 64
    weight = rng.normal(size=(k, n)).astype(np.float32)
    calibration, held_out = _activations(rng, 512, k), _activations(rng, 256, k)
    reference = held_out.astype(np.float32) @ weight
    rtn = MatMulNBitsQuantizer(_matmul_model(k, n, weight), bits=4, block_size=32, is_symmetric=True)
    rtn.process()
    gptq, _ = _gptq_model(weight, calibration, 4, 32)
    rtn_error = np.mean((_run(rtn.model.model, held_out) - reference) ** 2)
    gptq_error = np.mean((_run(gptq, held_out) - reference) ** 2)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


def test_an_input_channel_that_never_fires_is_stored_as_zero() -> None:
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(64, 8)).astype(np.float32)
    x = _activations(rng, 100, 64)
    x[:, 5] = 0.0
    packed, scales = quantize_weight(weight, x.T @ x, bits=4, block_size=32)
    assert np.all(dequantize(packed, scales, bits=4, k=64)[5] == 0)
