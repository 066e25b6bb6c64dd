"""INT4 weight-only: MatMul (and Gather) weights in 4-bit blocks (MatMulNBits), activations stay float."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.errors import InvalidRecipe, UnsupportedModel
from app.compression.quantize.weights import gemm_to_matmul, quantized_counts, weighted_nodes
from app.compression.scoring import Reference, fidelity_dict, sample_data

INT4_OPS = {"MatMul", "Gather"}


def run_int4(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    proto = graph.load(model)
    kinds = sorted(set(step.op_types or ["MatMul"]))
    if set(kinds) - INT4_OPS:
        raise InvalidRecipe(f"int4 quantizes MatMul (and Gather) weights only, not {', '.join(set(kinds) - INT4_OPS)}")
    # MatMulNBits replaces MatMul only: Linear layers exported as Gemm become MatMul + Add first.
    rewritten = gemm_to_matmul(proto) if "MatMul" in kinds else []
    targets = weighted_nodes(proto, set(kinds))
    if not [n for n in targets if n.op_type == "MatMul"] and not ("Gather" in kinds and targets):
        others = sorted({n.op_type for n in proto.graph.node} & {"Conv", "ConvTranspose", "LSTM", "GRU"})
        hint = f" (its {', '.join(others)} layers have no 4-bit kernel: use mode 'dynamic' or 'static')" \
            if others else ""
        raise UnsupportedModel(f"int4 needs MatMul or Gemm layers with constant weights; this model has none{hint}")
    ctx.progress(0.2, "quantizing weights to 4 bits")
    quantizer = _nbits_quantizer()(proto, bits=4, block_size=step.block_size, is_symmetric=True,
                                     op_types_to_quantize=tuple(kinds))
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block (a padding row) has scale 0: stored 0
        quantizer.process()
    graph.save(quantizer.model.model, output)
    data = sample_data(model, ctx)
    ctx.progress(0.8, "measuring fidelity")
    fidelity = Reference(model, data, ctx.threads).measure(output) if data is not None else None
    return {
        "op_types_quantized": kinds, "block_size": step.block_size, "symmetric": True, "bits": 4,
        "preprocessing": None, "preprocessing_reason": "weight-only: needs no shapes or calibration",
        "weights_candidate": len(targets), "gemm_rewritten_to_matmul": len(rewritten),
        **quantized_counts(graph.load(output)),
        "fidelity": fidelity_dict(fidelity),
        "fidelity_data": None if data is None else {"source": data.source, "samples": len(data)},
    }


def _nbits_quantizer() -> Any:
    """Imported on first use, undoing its import-time `logging.basicConfig(level=INFO)`.

    In a process that has not configured logging, that call would turn on INFO logging process-wide (one line
    per node from every quantizer); in one that has, it does nothing and neither do we.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    return MatMulNBitsQuantizer
