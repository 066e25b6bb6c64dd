"""Response models of the management API, built from table rows; they document the contract in /docs."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.storage.tables import DatasetRow, ModelRow, VariantRow

# Shapes of real answers (the example CNN and its int8-dynamic variant), shown in /docs.
SHA256_EXAMPLE = "edd044b43af68a6ea3e540cf4e3e0d23e2a09fa5bc35c019422f11d707e4131f"
TIME_EXAMPLE = "2026-11-29T06:04:25Z"
REPORT_EXAMPLE = {
    "size_bytes": 131894, "size_ratio": 0.5484, "gzip_bytes": 118998, "parameters": 56784,
    "nonzero_parameters": 56402,
    "latency_ms": {"batch_1": {"p50": 0.0365, "p95": 0.0657, "runs": 422},
                   "batch_n": {"batch": 32, "p50": 1.004, "p95": 1.31, "runs": 50}},
    "speedup": {"batch_1": 0.984, "batch_n": 0.966},
    "fidelity": {"samples": 135, "agreement": 1.0, "accuracy": 1.0, "original_accuracy": 1.0,
                 "cosine_mean": 0.999989, "cosine_min": 0.999958, "max_abs_error": 0.1029, "relative_l2": 0.0046,
                 "data": "dataset"},
    "within_budget": True, "budget": {"metric": "agreement", "max_drop": 0.01},
    "steps": [{"step": {"op": "quantize", "mode": "dynamic"}, "notes": {"per_channel": True}}],
}
DATASET_EXAMPLE = {"id": "0b6f3c2e-8d1a-4f7e-a3c5-9e2d1b7a6c40", "name": "samples", "samples": 450, "has_labels": True,
                   "created_at": TIME_EXAMPLE}
VARIANT_EXAMPLE = {"name": "int8-dynamic", "recipe": {"steps": [{"op": "quantize", "mode": "dynamic"}]},
                   "parent": "original", "sha256": SHA256_EXAMPLE, "size_bytes": 131894, "created_at": TIME_EXAMPLE,
                   "report": REPORT_EXAMPLE}
ORIGINAL_EXAMPLE = {"name": "original", "recipe": None, "parent": None, "sha256": SHA256_EXAMPLE,
                    "size_bytes": 240525, "created_at": TIME_EXAMPLE, "report": None}


class TensorPublic(BaseModel):
    name: str = Field(description="Tensor name in the ONNX graph", examples=["input"])
    datatype: str = Field(description="Open Inference Protocol datatype", examples=["FP32"])
    shape: list[int] = Field(description="-1 marks a dynamic dimension", examples=[[-1, 1, 8, 8]])


class VariantPublic(BaseModel):
    name: str = Field(description="'original', or the name a compression gave it", examples=["int8-dynamic"])
    recipe: dict[str, Any] | None = Field(description="The recipe that produced it; null for the original",
                                          examples=[{"steps": [{"op": "quantize", "mode": "dynamic"}]}])
    parent: str | None = Field(description="The variant it was made from", examples=["original"])
    sha256: str = Field(description="sha256 of its ONNX file", examples=[SHA256_EXAMPLE])
    size_bytes: int = Field(description="Size of its ONNX file", examples=[131894])
    created_at: datetime = Field(description="When it was published (UTC)", examples=[TIME_EXAMPLE])
    report: dict[str, Any] | None = Field(description="Measured size, latency and fidelity against the original",
                                          examples=[REPORT_EXAMPLE])


class DatasetPublic(BaseModel):
    id: str = Field(description="Dataset id (UUID), or use its name", examples=[DATASET_EXAMPLE["id"]])
    name: str = Field(description="Its name, unique within the model", examples=["samples"])
    samples: int = Field(description="Number of samples (first dimension of every array)", examples=[450])
    has_labels: bool = Field(description="It holds a `labels` array, so accuracy can be measured", examples=[True])
    created_at: datetime = Field(description="When it was uploaded (UTC)", examples=[TIME_EXAMPLE])


class RoutingPublic(BaseModel):
    default: str = Field(description="The variant that answers unversioned requests", examples=["original"])
    canary: dict[str, Any] | None = Field(default=None, description="{variant, percent}: a share of unversioned "
                                          "requests answered by another variant", examples=[None])
    shadow: dict[str, Any] | None = Field(default=None, description="{variant, percent}: a share of requests also "
                                          "run on a candidate after the answer", examples=[None])


class ModelPublic(BaseModel):
    name: str = Field(description="The name it is served under", examples=["digits"])
    state: str = Field(description="ready | converting (a PyTorch upload being converted to ONNX) | failed",
                       examples=["ready"])
    error: str | None = Field(default=None, description="Why the model failed (its conversion), in words",
                              examples=[None])
    warnings: list[str] = Field(description="What the checks noticed without refusing the model", examples=[[]])
    format: str = Field(description="What was uploaded: onnx | torch.export | torchscript | huggingface",
                        examples=["onnx"])
    sha256: str = Field(description="sha256 of the uploaded file (a converted model's ONNX is its original "
                                    "variant)", examples=[SHA256_EXAMPLE])
    size_bytes: int = Field(description="Size of the uploaded file", examples=[240525])
    created_at: datetime = Field(description="When it was uploaded (UTC)", examples=[TIME_EXAMPLE])
    inputs: list[TensorPublic] = Field(description="Model inputs (empty while converting)",
                                       examples=[[{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]])
    outputs: list[TensorPublic] = Field(description="Model outputs (empty while converting)",
                                        examples=[[{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]])
    opset: int | None = Field(description="Version of the default ONNX operator set", examples=[17])
    parameters: int | None = Field(description="Number of weights (elements of all initializers)", examples=[57116])
    variants: list[VariantPublic] = Field(description="'original' first, then compressed variants",
                                          examples=[[ORIGINAL_EXAMPLE, VARIANT_EXAMPLE]])
    routing: RoutingPublic = Field(description="Which variant answers unversioned requests",
                                   examples=[{"default": "original", "canary": None, "shadow": None}])
    datasets: list[DatasetPublic] = Field(description="Datasets for calibration and measurement",
                                          examples=[[DATASET_EXAMPLE]])
    capture: dict[str, Any] | None = Field(
        default=None, description="Traffic capture: reservoir size and rows seen; null when off",
        examples=[{"samples": 1000, "seen": 5230}])
    conversion: dict[str, Any] | None = Field(
        default=None, description="PyTorch uploads: source format, state, the exporter used, dynamic axes, and the "
                                  "largest absolute difference between the ONNX model and PyTorch on the example "
                                  "inputs (max_abs_error, rows_checked); null for ONNX uploads",
        examples=[{"source_format": "torch.export", "state": "succeeded", "max_abs_error": 3.7e-08,
                   "rows_checked": 10, "dynamic_axes": {"x": [0]}, "exporter": "dynamo"}])
    task: str | None = Field(default=None, description="Text and image models: embeddings | classification | "
                                                       "token-classification | generation; null for tensor models",
                             examples=[None])
    generation: dict[str, Any] | None = Field(
        default=None, description="Generation models: the context length, whether a chat template came with the "
                                  "folder, and the end-of-sequence token ids; null for others",
        examples=[{"context_length": 2048, "chat_template": True, "eos_token_ids": [2]}])
    architecture: str | None = Field(default=None, description="Hugging Face folders: the transformers class "
                                                               "converted", examples=[None])
    tokenizer: bool = Field(default=False, description="The server tokenizes texts for this model (its own "
                                                       "tokenizer.json)", examples=[False])
    files: str | None = Field(default=None, description="'file', or 'folder of N files' for a model that keeps "
                                                        "external data (downloaded as a .tar)", examples=["file"])
    image: dict[str, Any] | None = Field(default=None, description="Image models: the input size and the image "
                                                                   "processor's normalization", examples=[None])
    shadow: dict[str, Any] = Field(
        default_factory=dict, description="Per shadow variant: requests, rows, agreement or cosine with the "
                                          "answering variant, mean latency of each side (all processes)",
        examples=[{"int8-static": {"requests": 120, "rows": 480, "metric": "agreement", "agreement": 0.995833,
                                   "cosine_mean": 0.999912, "answer_latency_ms": 0.41, "shadow_latency_ms": 0.28}}])


MODEL_EXAMPLE = {
    "name": "digits", "state": "ready", "error": None, "warnings": [], "format": "onnx", "sha256": SHA256_EXAMPLE,
    "size_bytes": 240525, "created_at": TIME_EXAMPLE,
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}], "opset": 17, "parameters": 57116,
    "variants": [ORIGINAL_EXAMPLE, VARIANT_EXAMPLE], "routing": {"default": "original", "canary": None, "shadow": None},
    "datasets": [DATASET_EXAMPLE], "capture": None, "conversion": None, "shadow": {},
}


class LatencyPublic(BaseModel):
    model: str = Field(description="The model", examples=["digits"])
    window_seconds: float = Field(description="Requests finished in about this many last seconds (fewer right "
                                              "after a start)", examples=[300.0])
    variants: dict[str, dict[str, float | int | None]] = Field(
        description="Per variant: requests, p50_ms, p99_ms (null without requests); generation models also "
                    "ttft_p50_ms, ttft_p99_ms (time to first token), decode_tokens_per_second (one request's rate, "
                    "averaged over requests) and generated_tokens",
        examples=[{"original": {"requests": 1200, "p50_ms": 0.41, "p99_ms": 1.9}}])


class ModelsPublic(BaseModel):
    models: list[ModelPublic] = Field(description="Every model, oldest first; each as GET /models/{name} gives "
                                                  "it", examples=[[MODEL_EXAMPLE]])


class DatasetsPublic(BaseModel):
    datasets: list[DatasetPublic] = Field(description="The model's datasets", examples=[[DATASET_EXAMPLE]])


class VariantsPublic(BaseModel):
    variants: list[VariantPublic] = Field(description="'original' first",
                                          examples=[[ORIGINAL_EXAMPLE, VARIANT_EXAMPLE]])


def variant_public(row: VariantRow) -> VariantPublic:
    return VariantPublic(
        name=row.name, recipe=row.recipe, parent=row.parent, sha256=row.sha256, size_bytes=row.size_bytes,
        created_at=row.created_at, report=row.report,
    )


def dataset_public(row: DatasetRow) -> DatasetPublic:
    return DatasetPublic(id=row.id, name=row.name, samples=row.samples, has_labels=row.has_labels,
                         created_at=row.created_at)


def model_public(row: ModelRow, shadow: dict[str, Any] | None = None) -> ModelPublic:
    config = row.config or {}
    conversion = config.get("conversion")
    folder = config.get("huggingface") or {}
    text = config.get("text")
    generation = config.get("generation")
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
        task=folder.get("task"), architecture=folder.get("architecture"),
        tokenizer=text is not None or generation is not None, generation=_generation_public(generation),
        files=config.get("files"), image=config.get("image"),
        shadow=shadow or {},
    )


def _generation_public(settings: dict[str, Any] | None) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {"context_length": settings.get("context_length"), "chat_template": bool(settings.get("chat_template")),
            "eos_token_ids": settings.get("eos_token_ids")}


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
    enabled: bool = Field(default=True, description="Stack concurrent requests into one onnxruntime call",
                          examples=[True])
    max_batch_size: int = Field(default=64, ge=1, le=4096, description="Rows per call at most", examples=[64])
    max_queue_delay_ms: float = Field(default=0.0, ge=0, le=1000, examples=[2.0], description=(
        "How long a request may wait for others when the model is idle; 0 batches only what queues up while "
        "the model is busy, so low load pays no latency"))
    text_padding: Literal["bucket", "longest"] = Field(default="bucket", examples=["bucket"], description=(
        "Text models: 'bucket' batches only texts whose lengths round to the same multiple of 16 (measured "
        "4x faster on mixed lengths); 'longest' batches any lengths, padded to the longest in the call"))


class SessionUpdate(BaseModel):
    intra_op_threads: int | None = Field(default=None, ge=0, le=256, examples=[2], description=(
        "onnxruntime intra-op threads for this variant (null: the server's SLIMSERVE_INTRA_OP_THREADS)"))
    graph_optimization_level: Literal["disabled", "basic", "extended", "all"] = Field(
        default="all", examples=["all"],
        description="onnxruntime graph optimizations when the session opens; the optimized graph is cached on disk "
                    "so the next start opens it directly")
