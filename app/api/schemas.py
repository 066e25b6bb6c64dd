"""Response models of the management API, built from table rows; they document the contract in /docs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.storage.tables import DatasetRow, ModelRow, VariantRow


class TensorPublic(BaseModel):
    name: str = Field(examples=["input"])
    datatype: str = Field(description="Open Inference Protocol datatype", examples=["FP32"])
    shape: list[int] = Field(description="-1 marks a dynamic dimension", examples=[[-1, 1, 8, 8]])


class VariantPublic(BaseModel):
    name: str = Field(examples=["original"])
    recipe: dict[str, Any] | None = Field(description="The recipe that produced it; null for the original")
    parent: str | None = Field(description="The variant it was made from")
    sha256: str = Field(description="sha256 of its ONNX file")
    size_bytes: int = Field(description="Size of its ONNX file", examples=[21640])
    created_at: datetime = Field(description="When it was published (UTC)")
    report: dict[str, Any] | None = Field(description="Measured size, latency and fidelity against the original")


class DatasetPublic(BaseModel):
    id: str = Field(description="Dataset id (UUID), or use its name", examples=["0b6f3c2e-8d1a-4f7e-a3c5-9e2d1b7a6c40"])
    name: str = Field(examples=["samples"])
    samples: int = Field(description="Number of samples (first dimension of every array)", examples=[450])
    has_labels: bool = Field(description="It holds a `labels` array, so accuracy can be measured")
    created_at: datetime = Field(description="When it was uploaded (UTC)")


class RoutingPublic(BaseModel):
    default: str = Field(examples=["original"])
    canary: dict[str, Any] | None = Field(default=None, description="{variant, percent}: a share of unversioned "
                                          "requests answered by another variant", examples=[None])
    shadow: dict[str, Any] | None = Field(default=None, description="{variant, percent}: a share of requests also "
                                          "run on a candidate after the answer", examples=[None])


class ModelPublic(BaseModel):
    name: str = Field(examples=["digits"])
    state: str = Field(description="ready | converting (a PyTorch upload being converted to ONNX) | failed",
                       examples=["ready"])
    error: str | None = Field(default=None, description="Why the model failed (its conversion), in words",
                              examples=[None])
    warnings: list[str] = Field(description="What the checks noticed without refusing the model", examples=[[]])
    format: str = Field(description="What was uploaded: onnx | torch.export | torchscript", examples=["onnx"])
    sha256: str = Field(description="sha256 of the uploaded file (a converted model's ONNX is its original "
                                    "variant)")
    size_bytes: int = Field(description="Size of the uploaded file")
    created_at: datetime = Field(description="When it was uploaded (UTC)")
    inputs: list[TensorPublic] = Field(description="Model inputs (empty while converting)")
    outputs: list[TensorPublic] = Field(description="Model outputs (empty while converting)")
    opset: int | None = Field(description="Version of the default ONNX operator set")
    parameters: int | None = Field(description="Number of weights (elements of all initializers)")
    variants: list[VariantPublic] = Field(description="'original' first, then compressed variants")
    routing: RoutingPublic = Field(description="Which variant answers unversioned requests")
    datasets: list[DatasetPublic] = Field(description="Datasets for calibration and measurement")
    capture: dict[str, Any] | None = Field(
        default=None, description="Traffic capture: reservoir size and rows seen; null when off")
    conversion: dict[str, Any] | None = Field(
        default=None, description="PyTorch uploads: source format, state, the exporter used, dynamic axes, and the "
                                  "largest absolute difference between the ONNX model and PyTorch on the example "
                                  "inputs (max_abs_error, rows_checked); null for ONNX uploads",
        examples=[{"source_format": "torch.export", "state": "succeeded", "max_abs_error": 3.7e-08,
                   "rows_checked": 10, "dynamic_axes": {"x": [0]}, "exporter": "dynamo"}])
    shadow: dict[str, Any] = Field(
        default_factory=dict, description="Per shadow variant: requests, rows, agreement or cosine with the "
                                          "answering variant, mean latency of each side (all processes)")


class LatencyPublic(BaseModel):
    model: str = Field(examples=["digits"])
    window_seconds: float = Field(description="Requests finished in about this many last seconds (fewer right "
                                              "after a start)", examples=[300.0])
    variants: dict[str, dict[str, float | int | None]] = Field(
        description="Per variant: requests, p50_ms, p99_ms (null without requests)",
        examples=[{"original": {"requests": 1200, "p50_ms": 0.41, "p99_ms": 1.9}}])


class ModelsPublic(BaseModel):
    models: list[ModelPublic] = Field(description="Every model, oldest first")


class DatasetsPublic(BaseModel):
    datasets: list[DatasetPublic] = Field(description="The model's datasets")


class VariantsPublic(BaseModel):
    variants: list[VariantPublic] = Field(description="'original' first")


def variant_public(row: VariantRow) -> VariantPublic:
    return VariantPublic(
        name=row.name, recipe=row.recipe, parent=row.parent, sha256=row.sha256, size_bytes=row.size_bytes,
        created_at=row.created_at, report=row.report,
    )


def dataset_public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic(id=row.id, name=row.name, samples=row.samples, has_labels=row.has_labels,
                         created_at=row.created_at)


def model_public(row: ModelRow, shadow: dict[str, Any] | None = None) -> ModelPublic:
    conversion = (row.config or {}).get("conversion")
    return ModelPublic(
        name=row.name, state=row.state, error=conversion.get("error") if conversion else None,
        warnings=list(row.warnings), format=row.format, sha256=row.sha256,
        size_bytes=row.size_bytes, created_at=row.created_at,
        inputs=[TensorPublic(**t) for t in row.inputs], outputs=[TensorPublic(**t) for t in row.outputs],
        opset=row.opset, parameters=row.parameters,
        variants=[variant_public(v) for v in row.variants],
        routing=RoutingPublic(**row.routing),
        datasets=[dataset_public(d) for d in row.datasets],
        capture=(row.config or {}).get("capture"),
        conversion=conversion,
        shadow=shadow or {},
    )


class CaptureUpdate(BaseModel):
    samples: int = Field(ge=1, le=100_000, description="Reservoir size: how many prediction inputs to keep",
                         examples=[1000])


class RoutingUpdate(BaseModel):
    default: str = Field(examples=["original"], description="Variant that answers unversioned requests")
    canary: dict[str, Any] | None = Field(default=None, examples=[{"variant": "int8-static", "percent": 10}],
                                          description="This percent of unversioned requests go to another "
                                                      "variant; a request id always lands on the same side")
    shadow: dict[str, Any] | None = Field(default=None, examples=[{"variant": "shrink-50", "percent": 5}],
                                          description="This percent of requests also run on a candidate "
                                                      "after the answer is sent; the answer never changes")


class BatchingUpdate(BaseModel):
    enabled: bool = Field(default=True, description="Stack concurrent requests into one onnxruntime call")
    max_batch_size: int = Field(default=64, ge=1, le=4096, description="Rows per call at most")
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000, description=(
        "How long a request may wait for others when the model is idle; 0 batches only what queues up while "
        "the model is busy, so low load pays no latency"))


class SessionUpdate(BaseModel):
    intra_op_threads: int | None = Field(default=None, ge=0, le=256, description=(
        "onnxruntime intra-op threads for this variant (null: the server's SLIMSERVE_INTRA_OP_THREADS)"))
    graph_optimization_level: Literal["disabled", "basic", "extended", "all"] = Field(
        default="all", description="onnxruntime graph optimizations when the session opens; the optimized graph "
                                   "is cached on disk so the next start opens it directly")
