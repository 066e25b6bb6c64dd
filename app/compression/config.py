"""Recipes: typed, validated steps, the named presets, and the accuracy budget."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from app.compression.errors import InvalidRecipe


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class QatConfig(_Step):
    """Quantization-aware training after static calibration: fake-quantized weights trained on the original."""

    epochs: int = Field(default=3, ge=1, le=100)
    lr: float = Field(default=2e-5, gt=0.0, le=1.0)
    batch_size: int = Field(default=32, ge=1, le=4096)


class QuantizeStep(_Step):
    """INT8 dynamic/static (QDQ), FP16, or INT4 weight-only quantization; INT4/INT8 weight-only for LLMs."""

    op: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static", "fp16", "int4", "int8"]
    """`int8` is weight-only INT8 (MatMulNBits, 8 bits) for generation models."""
    algorithm: Literal["rtn", "k_quant", "gptq", "hqq", "gptq_inc"] | None = None
    """Generation models: how weights are rounded to INT4/INT8; None: rtn. rtn, k_quant, hqq and gptq_inc are
    onnxruntime's MatMulNBits quantizer; gptq is SlimServe's (the head too), calibrated on the dataset's text."""
    lm_head: Literal["auto", "quantize", "int8", "float"] = "auto"
    """Generation models: the LM head (the largest, most output-sensitive MatMul) at the step's precision, at
    INT8, or in float; auto measures INT8 against the step's precision on the dataset and keeps the head at INT8
    when it lowers the perplexity increase by a third or more."""
    edge_blocks: Literal["auto", "quantize", "int8"] = "auto"
    """Generation models, INT4: the first and last decoder blocks at INT4 or INT8; auto measures both on the
    dataset and keeps INT8 when it lowers the perplexity increase by a third or more (models of three blocks or
    more)."""
    embeddings: Literal["auto", "quantize", "float"] = "auto"
    """Generation models, INT4: the token embedding table in 4-bit blocks (GatherBlockQuantized, as llama.cpp's
    Q4_0 does) or kept in float; auto measures both and keeps float only when the 4-bit table leaves the variant
    over the perplexity budget and float lowers it (the table costs size, not speed). INT8 keeps it in float
    (onnxruntime gathers 4-bit tables only)."""
    per_channel: bool | None = None
    """Per-channel weights; None lets the step measure both and keep the more faithful one (dynamic)."""
    calibration: Literal["auto", "minmax", "entropy", "percentile"] = "auto"
    """Static only: how activation ranges are calibrated; auto measures each method and keeps the most faithful."""
    smoothing: float | Literal["auto"] | None = "auto"
    """Static only: SmoothQuant's migration strength alpha (0 < alpha < 1) folded into the LayerNorms before the
    MatMuls they feed; auto tries 0.5 and keeps it where it measures more faithful; None turns it off."""
    block_size: int = Field(default=32, ge=16, le=256)
    """INT4 only: weights per quantization block (a power of two)."""
    accuracy_level: Literal["auto", 0, 1, 4] = "auto"
    """INT4 only: MatMulNBits' compute type (0 unset, 1 float32, 4 int8 activations); auto measures 1 and 4 on the
    model's samples and keeps the faster unless it costs fidelity."""
    op_types: list[str] | None = None
    """Operator types to quantize; None: the step's default for the model (MatMul/Gemm on CNNs for dynamic)."""
    qat: QatConfig | None = None
    """Static only: quantization-aware training of the calibrated model on the original's outputs (needs data)."""

    @model_validator(mode="after")
    def _block_is_power_of_two(self) -> QuantizeStep:
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if isinstance(self.smoothing, float) and not 0.0 < self.smoothing < 1.0:
            raise ValueError(f"smoothing is SmoothQuant's alpha, between 0 and 1 exclusive, got {self.smoothing}")
        if self.qat is not None and self.mode != "static":
            raise ValueError(f"qat trains a static INT8 model; mode is '{self.mode}'")
        return self


class PruneStep(_Step):
    """Unstructured (zeroes weights) or structured (removes neurons, channels, attention heads, blocks) pruning."""

    op: Literal["prune"] = "prune"
    mode: Literal["unstructured", "structured", "heads", "ffn", "layers"]
    sparsity: float = Field(gt=0.0, lt=1.0)
    """Fraction to remove: of weights (unstructured); of neurons/channels per prunable layer (structured on a
    CNN or MLP); of each block's attention heads (heads) or FFN neurons (ffn); of the encoder blocks (layers); of
    the encoder blocks' parameters (structured on a transformer with a dataset)."""
    importance: Literal["l1", "l2", "taylor", "activation"] | None = None
    """How what is removed is ranked. None: activation-based on transformers with a dataset (heads, neurons,
    blocks), else l2 weight norms; l1/l2/taylor keep structured pruning on channels (taylor needs data)."""
    repair: bool = True
    """Transformer modes: refit the shrunken output projections by least squares before any training."""


class OptimizeStep(_Step):
    """onnxruntime graph optimizations saved into the model; weights unchanged."""

    op: Literal["optimize"] = "optimize"
    level: Literal["auto", "basic", "extended", "transformer"] = "auto"
    """auto: transformer fusions on transformer graphs, onnxruntime's basic level elsewhere."""


class DistillStep(_Step):
    """Train the current model (or another uploaded student) on the original's outputs."""

    op: Literal["distill"] = "distill"
    student: str = "current"
    """`current` (the recipe's model so far) or the name of an uploaded model with the same inputs/outputs."""
    epochs: int | None = Field(default=None, ge=1, le=1000)
    """None: 8 for a transformer (an epoch of 512 sequences of 128 tokens takes about 45 s here), else 50."""
    temperature: float = Field(default=4.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)
    """Weight of the teacher's soft targets; 1 - alpha goes to hard labels when the dataset has them."""
    lr: float | None = Field(default=None, gt=0.0, le=1.0)
    """Adam's learning rate; None: 1e-4 for a transformer (a larger step undoes its pre-training), else 1e-3."""
    batch_size: int = Field(default=64, ge=1, le=4096)
    patience: int = Field(default=8, ge=1, le=100)
    """Epochs without improvement on the held-out split before training stops."""
    hidden_states: bool = True
    """Also match the teacher's residual stream after every block the student kept (a pruned transformer)."""


Step = Annotated[QuantizeStep | PruneStep | OptimizeStep | DistillStep, Field(discriminator="op")]


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    steps: list[Step] = Field(min_length=1, max_length=16)
    name: str | None = None
    """The preset this recipe came from, if any."""


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    metric: Literal["agreement", "accuracy", "cosine", "perplexity"] = "agreement"
    max_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    max_increase: float = Field(default=0.05, ge=0.0, le=10.0)
    """Metric `perplexity` (generation models): the largest relative increase over the original's perplexity."""


_SMALLEST_TRANSFORMER: list[dict[str, Any]] = [
    {"op": "quantize", "mode": "int4", "op_types": ["Gather"]}, {"op": "optimize", "level": "auto"},
    {"op": "quantize", "mode": "dynamic", "op_types": ["MatMul"]}]
PRESETS: dict[str, list[dict[str, Any]]] = {
    "optimize": [{"op": "optimize", "level": "auto"}],
    # Fusing attention first is what makes INT8 pay on transformers (measured: 0.72x latency against 0.94x).
    "int8-dynamic": [{"op": "optimize", "level": "auto"}, {"op": "quantize", "mode": "dynamic"}],
    "int8-static": [{"op": "quantize", "mode": "static"}],
    "fp16": [{"op": "quantize", "mode": "fp16"}],
    "int4-weight": [{"op": "quantize", "mode": "int4", "block_size": 32}],
    "prune-50": [{"op": "prune", "mode": "unstructured", "sparsity": 0.5}],
    "shrink-50": [{"op": "prune", "mode": "structured", "sparsity": 0.5}, {"op": "distill"}],
    # Transformers: half (or 70%) of the blocks' parameters removed as measured cheapest, distilled, then 4-bit
    # embedding tables and INT8 MatMuls (the INT8 embeddings of int8-dynamic are twice the size at no speed gain).
    "shrink-50-int8": [{"op": "prune", "mode": "structured", "sparsity": 0.5}, {"op": "distill"},
                       *_SMALLEST_TRANSFORMER],
    "shrink-70-int8": [{"op": "prune", "mode": "structured", "sparsity": 0.7}, {"op": "distill"},
                       *_SMALLEST_TRANSFORMER],
}
AUTO = "auto"

_STEP_ADAPTER: TypeAdapter[Step] = TypeAdapter(Step)


def parse_recipe(spec: str | dict[str, Any]) -> Recipe:
    """A preset name or `{"steps": [...]}`; raises InvalidRecipe naming the problem."""
    if isinstance(spec, str):
        if spec == AUTO:
            raise InvalidRecipe("'auto' is a search over recipes, not a single recipe; use the search API")
        if spec not in PRESETS:
            raise InvalidRecipe(f"unknown preset '{spec[:64]}'; presets: {', '.join([*PRESETS, AUTO])}")
        return Recipe(steps=[_STEP_ADAPTER.validate_python(s) for s in PRESETS[spec]], name=spec)
    if not isinstance(spec, dict):
        raise InvalidRecipe("a recipe is a preset name or an object with 'steps'")
    try:
        return Recipe.model_validate(spec)
    except ValidationError as exc:
        raise InvalidRecipe(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "union_tag_invalid":
            problems.append(f"{where}: unknown op {error.get('input', {}).get('op')!r}; "
                            "ops: quantize, prune, optimize, distill")
        else:
            problems.append(f"{where}: {error['msg']}")
    return "invalid recipe: " + "; ".join(problems)
