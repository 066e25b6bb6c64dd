"""Dynamic INT8: integer weights, activations quantized at run time; per-tensor or per-channel by measurement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from app.compression import graph
from app.compression.config import QuantizeStep
from app.compression.context import StepContext
from app.compression.errors import InvalidRecipe, UnsupportedModel
from app.compression.graph import op_types
from app.compression.quantize.preprocess import preprocess
from app.compression.quantize.weight_only import convolution_weights, quantize_convolution_weights
from app.compression.quantize.weights import gemm_to_matmul, quantized_counts, weighted_nodes
from app.compression.scoring import Fidelity, Reference, fidelity_dict, sample_data

# Op types with an integer kernel in dynamic mode (onnxruntime's IntegerOpsRegistry), plus Gemm, which we
# rewrite to MatMul + Add first because that registry has no Gemm.
DYNAMIC_OPS = {"MatMul", "Gemm", "Conv", "Attention", "LSTM", "Gather", "EmbedLayerNormalization", "Transpose"}


# Below this cosine (or top-1 agreement) against the input, a narrower set of op types is tried.
MIN_COSINE = 0.99
_WEIGHT_OPS = {"MatMul", "Conv", "Attention", "LSTM", "Gather", "EmbedLayerNormalization"}


CONV_REASON = ("integer Conv (ConvInteger) measured 4-12x slower than float Conv here: Conv weights are stored in "
               "int8 instead (weight-only, folded to float at load); add 'Conv' to op_types for ConvInteger")


def run_dynamic(model: Path, output: Path, step: QuantizeStep, ctx: StepContext) -> dict[str, Any]:
    pre = ctx.workdir / "preprocessed.onnx"
    notes: dict[str, Any] = preprocess(model, pre, ctx.workdir, ctx.progress)
    proto = graph.load(pre)
    kinds, skipped = _dynamic_op_types(proto, step)
    rewritten = gemm_to_matmul(proto) if "Gemm" in kinds else []
    quantize_kinds = sorted((set(kinds) - {"Gemm"}) | ({"MatMul"} if rewritten else set()))
    dynamic = bool(weighted_nodes(proto, _WEIGHT_OPS & set(quantize_kinds)))
    weight_only = "Conv" in skipped and bool(convolution_weights(proto))
    if not dynamic and not weight_only:
        raise UnsupportedModel(
            "dynamic quantization found no layer with constant weights among "
            f"{', '.join(kinds) or 'the requested op types'}; this model has {', '.join(sorted(op_types(proto)))}")
    prepared = graph.save(proto, ctx.workdir / "prepared.onnx")
    ctx.progress(0.2, "quantizing")
    if dynamic:
        choice = _per_channel_choice(model, prepared, quantize_kinds, step, ctx)
        if step.op_types is None and _below_target(choice) and set(quantize_kinds) - {"MatMul"}:
            # a fused op's integer kernel lost accuracy: the plain projections alone, kept if more faithful
            narrow = _per_channel_choice(model, prepared, ["MatMul"], step, ctx, tag="matmul-")
            if _score_of(narrow) > _score_of(choice):
                notes["narrowed"] = (f"quantizing {', '.join(quantize_kinds)} missed the fidelity target "
                                     f"(cosine {choice['fidelity']['cosine_mean']}); MatMul alone kept instead")
                choice, quantize_kinds = narrow, ["MatMul"]
        kept_float = unquantizable_attention(proto)
        if kept_float:
            notes["nodes_kept_float"] = kept_float
        quantized = graph.load(choice.pop("path"))
    else:
        choice, quantized = {}, proto
    if weight_only:
        notes["convolutions_weight_only"] = quantize_convolution_weights(quantized)
        skipped = {k: v for k, v in skipped.items() if k != "Conv"}
    graph.save(quantized, output)
    if weight_only:
        choice.update(_fidelity_of(model, output, ctx))
    notes.update({
        "weight_type": "int8", "activation_type": "uint8 (quantized at run time)" if dynamic else None,
        "op_types_quantized": quantize_kinds if dynamic else [], "op_types_skipped": skipped,
        "weight_only_op_types": ["Conv"] if weight_only else [],
        "gemm_rewritten_to_matmul": len(rewritten), **choice, **quantized_counts(graph.load(output)),
    })
    return notes


def _below_target(choice: dict[str, Any]) -> bool:
    fidelity = choice.get("fidelity")
    return fidelity is not None and (fidelity["cosine_mean"] < MIN_COSINE or (
        fidelity["agreement"] is not None and fidelity["agreement"] < MIN_COSINE))


def _score_of(choice: dict[str, Any]) -> tuple[float, float]:
    fidelity = choice.get("fidelity") or {}
    cosine = float(fidelity.get("cosine_mean", -1.0))
    agreement = fidelity.get("agreement")
    return (float(agreement) if agreement is not None else cosine, cosine)


def _fidelity_of(model: Path, output: Path, ctx: StepContext) -> dict[str, Any]:
    data = sample_data(model, ctx)
    fidelity = Reference(model, data, ctx.threads).measure(output) if data is not None else None
    return {"fidelity": fidelity_dict(fidelity),
            "fidelity_data": None if data is None else {"source": data.source, "samples": len(data)}}


def _dynamic_op_types(proto: onnx.ModelProto, step: QuantizeStep) -> tuple[list[str], dict[str, str]]:
    present = op_types(proto)
    if step.op_types is not None:
        unknown = sorted(set(step.op_types) - DYNAMIC_OPS)
        if unknown:
            raise InvalidRecipe(f"dynamic quantization cannot quantize {', '.join(unknown)}; "
                                f"it quantizes {', '.join(sorted(DYNAMIC_OPS))}")
        return sorted(present & set(step.op_types)), {}
    if "Conv" in present:
        return sorted(present & {"MatMul", "Gemm"}), {"Conv": CONV_REASON}
    return sorted(present & DYNAMIC_OPS), {}


def unquantizable_attention(model: onnx.ModelProto) -> dict[str, str]:
    """Fused nodes whose integer version would silently drop an input, so quantizing them changes the model:
    QAttention has no attention_bias (a relative position bias, a [B,1,S,S] mask) and no past state;
    QEmbedLayerNormalization has no position_ids (MPNet and RoBERTa count positions from the padding)."""
    found = {}
    for index, node in enumerate(model.graph.node):
        if node.domain != "com.microsoft":
            continue
        if node.op_type == "Attention" and any(node.input[4:]):
            found[node.name or f"Attention_{index}"] = "its attention_bias or past input has no QAttention equivalent"
        if node.op_type == "EmbedLayerNormalization" and any(node.input[8:]):
            found[node.name or f"EmbedLayerNormalization_{index}"] = \
                "its position_ids input has no QEmbedLayerNormalization equivalent"
    return found


def _quantize_dynamic(source: Path, target: Path, kinds: list[str], per_channel: bool) -> Path:
    excluded = unquantizable_attention(graph.load(source, weights=False))
    quantize_dynamic(str(source), str(target), op_types_to_quantize=kinds, per_channel=per_channel,
                     weight_type=QuantType.QInt8, nodes_to_exclude=sorted(excluded),
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
                     # past 2 GB onnxruntime must write (and reload) the result with external data
                     use_external_data_format=graph.model_bytes(source) > graph.LARGE_MODEL_BYTES)
    return target


def _per_channel_choice(model: Path, prepared: Path, kinds: list[str], step: QuantizeStep,
                        ctx: StepContext, tag: str = "") -> dict[str, Any]:
    """Quantize per-tensor and per-channel and keep the more faithful, unless the recipe chose."""
    data = sample_data(model, ctx)
    reference = Reference(model, data, ctx.threads) if data is not None else None
    options = [step.per_channel] if step.per_channel is not None else [False, True]
    results: dict[bool, tuple[Path, Fidelity | None]] = {}
    for index, per_channel in enumerate(options):
        ctx.progress(0.2 + 0.35 * index, f"quantizing ({'per-channel' if per_channel else 'per-tensor'})")
        path = _quantize_dynamic(prepared, ctx.workdir / f"dynamic-{tag}{per_channel}.onnx", kinds, per_channel)
        results[per_channel] = (path, reference.measure(path) if reference is not None else None)
    if len(results) == 1:
        chosen, reason = options[0], "set by the recipe"
    elif reference is None:
        chosen, reason = False, "not measured: no dataset, and inputs that cannot be generated; per-tensor"
    else:
        # On a tie per-tensor wins: fewer scales, and the faster kernel.
        chosen = _score(results[True][1]) > _score(results[False][1])
        reason = "more faithful on " + ("the dataset" if data is not None and data.source == "dataset"
                                        else "generated inputs")
    return {
        "path": results[chosen][0], "per_channel": chosen, "per_channel_reason": reason,
        "fidelity": fidelity_dict(results[chosen][1]),
        "per_channel_measurements": {("per_channel" if k else "per_tensor"): fidelity_dict(v[1])
                                     for k, v in results.items()},
        "fidelity_data": None if data is None else {"source": data.source, "samples": len(data)},
    }


def _score(fidelity: Fidelity | None) -> tuple[float, float]:
    return fidelity.score() if fidelity is not None else (-1.0, -1.0)
