"""GPTQ (Frantar et al., 2022) on an onnxruntime-genai decoder, in numpy, written as MatMulNBits.

Each MatMul's weight is quantized one input row at a time; the rounding error of a row is spread over the rows
not yet quantized through the inverse Hessian of that MatMul's inputs (H = XᵀX over the calibration tokens), so
the layer's output on real activations, not its weights, stays close. Per block of `block_size` input rows and
per output column, the scale is chosen among clipped candidates by the error it leaves, weighted by H's diagonal
(how much each input carries). The result is the symmetric 4-bit (or 8-bit) MatMulNBits that RTN writes, at
RTN's speed; only the stored integers and scales differ.

The Hessians come from the fp32 decoder itself: its MatMul inputs are added as graph outputs and the
calibration sequences are scored from an empty past.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from app.compression.llm.forward import DecoderSession, genai_config

SEQUENCES = 32
TOKENS = 256
PERCENT_DAMPING = 0.01
_LAZY_COLUMNS = 128  # the error of this many rows is applied to the rest at once (a multiple of block sizes)
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def calibrate(model: onnx.ModelProto, folder: Path, sequences: list[list[int]], *, threads: int,
              scratch: Path | None = None, check: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """The Hessian of every weighted MatMul's input in `model` (the decoder of `folder`), by tensor name."""
    inputs = {node.input[0] for node in weighted_matmuls(model)}
    return hessians(folder, inputs, sequences, threads=threads, scratch=scratch, check=check)


def quantize_model(model: onnx.ModelProto, sums: dict[str, np.ndarray], *, bits: int, block_size: int,
                   only: set[str] | None = None, check: Callable[[], None] | None = None) -> None:
    """The weighted MatMuls of `model` (loaded with its weights), all or `only` these names, as MatMulNBits by
    GPTQ with the Hessians of `calibrate`, in place."""
    nodes = [node for node in weighted_matmuls(model) if only is None or node.name in only]
    initializers = {t.name: t for t in model.graph.initializer}
    for node in nodes:
        if check is not None:
            check()
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        # An input the calibration text never reached: importance alike everywhere, i.e. clipped rounding.
        hessian = sums.get(node.input[0], np.eye(weight.shape[0]))
        packed, scales = quantize_weight(weight, hessian, bits=bits, block_size=block_size)
        replacement, tensors = matmul_nbits(node, packed, scales, k=weight.shape[0], n=weight.shape[1], bits=bits,
                                            block_size=block_size)
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(index, replacement)
        model.graph.initializer.extend(tensors)
    drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)


def weighted_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls whose second input is a 2-D float initializer (a weight)."""
    weights = {t.name: t for t in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in weights
            and len(weights[node.input[1]].dims) == 2 and weights[node.input[1]].data_type == onnx.TensorProto.FLOAT]


def hessians(folder: Path, inputs: set[str], sequences: list[list[int]], *, threads: int,
             scratch: Path | None = None, check: Callable[[], None] | None = None) -> dict[str, np.ndarray]:
    """XᵀX (float64, [K, K]) of each named decoder tensor over every token of the calibration sequences.

    The probe graph is written in `scratch` (default: beside `folder`) with the weights hard-linked: onnxruntime
    refuses external data reached through a symbolic link, and a copy would double a large model on disk."""
    filename = genai_config(folder)["model"]["decoder"]["filename"]
    model = onnx.load(str(folder / filename), load_external_data=False)
    outputs = {o.name for o in model.graph.output}
    for name in sorted(inputs - outputs):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sums: dict[str, np.ndarray] = {}
    parent = scratch or folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gptq-", dir=parent) as probe_dir:
        probe = Path(probe_dir)
        for path in folder.iterdir():  # the graph rewritten, every other file (weights too) linked, never copied
            if path.name != filename and path.is_file():
                _link(path, probe / path.name)
        onnx.save(model, str(probe / filename))
        session = DecoderSession(probe, threads=threads)
        names = sorted(inputs)
        for ids in sequences[:SEQUENCES]:
            if check is not None:
                check()
            if len(ids) < 2:
                continue
            for name, value in zip(names, session.session.run(names, session.feeds(ids[:TOKENS])), strict=True):
                rows = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
                product = rows.T @ rows
                sums[name] = sums[name] + product if name in sums else product
        del session
    return sums


def quantize_weight(weight: np.ndarray, hessian: np.ndarray, *, bits: int, block_size: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of a [K, N] weight (x @ W) → (packed [N, K/block, block*bits/8] uint8, scales [N, K/block] float32),
    MatMulNBits' layout with its default zero point (2^(bits-1)), i.e. symmetric."""
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = blocks * block_size
    w = np.zeros((n, padded), dtype=np.float64)
    w[:, :k] = weight.T
    h = np.eye(padded, dtype=np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(padded)] += PERCENT_DAMPING * np.mean(np.diag(h))
    upper = _inverse_cholesky_upper(h)
    importance = np.diag(h)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    integers = np.zeros((n, padded), dtype=np.int16)
    scales = np.zeros((n, blocks), dtype=np.float64)
    for start in range(0, padded, _LAZY_COLUMNS):
        end = min(start + _LAZY_COLUMNS, padded)
        chunk = w[:, start:end].copy()
        errors = np.zeros_like(chunk)
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                scale = _block_scale(chunk[:, i:i + block_size], importance[column:column + block_size], low, high)
                scales[:, column // block_size] = scale
            values = chunk[:, i]
            q = np.clip(np.rint(values / scale), low, high)
            integers[:, column] = q
            error = (values - q * scale) / upper[start + i, start + i]
            chunk[:, i:] -= np.outer(error, upper[start + i, start + i:end])
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return _pack(integers - low, bits, block_size), scales.astype(np.float32)


def dequantize(packed: np.ndarray, scales: np.ndarray, *, bits: int, k: int) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits (default zero point) computes with."""
    unsigned = _unpack(packed, bits)
    n, blocks, block_size = unsigned.shape
    values = (unsigned.astype(np.float32) - (1 << (bits - 1))) * scales[:, :, None]
    return np.ascontiguousarray(values.reshape(n, blocks * block_size)[:, :k].T)


def matmul_nbits(node: onnx.NodeProto, packed: np.ndarray, scales: np.ndarray, *, k: int, n: int, bits: int,
                 block_size: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits node (and its initializers) that replaces `node`."""
    weight = node.input[1]
    tensors = [numpy_helper.from_array(packed, f"{weight}_Q{bits}"),
               numpy_helper.from_array(scales.reshape(-1), f"{weight}_scales")]
    replacement = onnx.helper.make_node("MatMulNBits", [node.input[0], tensors[0].name, tensors[1].name],
                                        list(node.output), name=f"{node.name}_Q{bits}", domain="com.microsoft",
                                        K=k, N=n, bits=bits, block_size=block_size)
    return replacement, tensors


def _block_scale(block: np.ndarray, importance: np.ndarray, low: int, high: int) -> np.ndarray:
    """Per row of a [N, block] slice, the scale of least importance-weighted error among the candidates: the
    signed largest value mapped to `low` (as onnxruntime's RTN does: all 2^bits levels used) or its magnitude
    mapped to `high`, each also clipped."""
    rows = np.arange(block.shape[0])
    extreme = block[rows, np.abs(block).argmax(axis=1)]
    candidates = []
    for ratio in _CLIP_RATIOS:
        candidates.append(extreme * ratio / low)
        candidates.append(np.abs(extreme) * ratio / high)
    best, best_error = None, None
    for scale in candidates:
        safe = np.where(scale == 0, 1.0, scale)
        q = np.clip(np.rint(block / safe[:, None]), low, high)
        error = ((block - q * scale[:, None]) ** 2) @ importance
        if best is None:
            best, best_error = scale, error
        else:
            better = error < best_error
            best = np.where(better, scale, best)
            best_error = np.where(better, error, best_error)
    assert best is not None
    result: np.ndarray = np.where(best == 0, 1.0, best)  # an all-zero block: any scale stores it exactly
    return result


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """U, upper triangular, with H⁻¹ = UᵀU (what GPTQ's update reads), damping more if H is not positive."""
    damping = PERCENT_DAMPING * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            lower = np.linalg.cholesky(np.linalg.inv(h))
            result: np.ndarray = lower.T
            return result
        except np.linalg.LinAlgError:
            h = h + damping * np.eye(h.shape[0])
            damping *= 10
    raise np.linalg.LinAlgError("the calibration Hessian is not positive definite even after damping")


def _pack(unsigned: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    n, padded = unsigned.shape
    values = unsigned.astype(np.uint8).reshape(n, padded // block_size, block_size)
    if bits == 8:
        return values
    packed: np.ndarray = (values[..., 0::2] & 0x0F) | ((values[..., 1::2] & 0x0F) << 4)
    return packed.astype(np.uint8)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    n, blocks, half = packed.shape
    values = np.empty((n, blocks, half * 2), dtype=np.uint8)
    values[..., 0::2] = packed & 0x0F
    values[..., 1::2] = packed >> 4
    return values


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem: a copy, since onnxruntime wants the weights in the graph's own folder
        shutil.copy2(source, target)
