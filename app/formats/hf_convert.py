"""A vetted Hugging Face folder -> ONNX (with the task's head and pooling), checked against transformers, plus one
`tokenizer.json` and the settings the server needs to tokenize: runs in the worker, offline, never remote code.

The exported graph takes token tensors (`input_ids`, `attention_mask`, and `token_type_ids` when the model uses
them) or `pixel_values`, with dynamic batch and sequence axes, and returns what the task serves: `embeddings`
(the folder's own pooling and normalization; mean pooling without a sentence-transformers layout), or `logits`
for classification heads. Models over 1.5 GB of weights are exported with their weights as external data.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidContent
from app.formats.huggingface import MODEL_TYPES, HuggingFaceFolder

Progress = Callable[[float, str], None]
OPSET = 17
EXTERNAL_FROM_BYTES = 1536 * 1024**2
TOLERANCE = 1e-3
# Texts the conversion is checked on: short and long, punctuation, digits, other scripts.
CHECK_TEXTS = [
    "Hello world.",
    "SlimServe compresses models and serves them over standard protocols.",
    "The quick brown fox jumps over the lazy dog, 12 times in 3 minutes!",
    "Une phrase en français, avec des accents : é, è, à, ç.",
    "短い文。",
    "Transformers turn token ids into contextual vectors; pooling turns those into one vector per text, which "
    "is what a search index stores and compares by cosine similarity.",
]


@dataclass
class TextSettings:
    """What the server needs to tokenize for this model (stored with it as JSON)."""

    task: str
    inputs: list[str]
    max_length: int
    pad_id: int
    labels: dict[str, str] = field(default_factory=dict)
    dimensions: int | None = None
    image: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "inputs": self.inputs, "max_length": self.max_length, "pad_id": self.pad_id,
                "labels": self.labels, "dimensions": self.dimensions, "image": self.image}


@dataclass
class HuggingFaceConversion:
    onnx: Path
    tokenizer: Path | None
    settings: TextSettings
    max_abs_error: float
    cosine_min: float
    rows_checked: int
    exporter: str
    external_data: bool
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_error": self.max_abs_error, "cosine_min": self.cosine_min, "rows_checked": self.rows_checked,
                "exporter": self.exporter, "external_data": self.external_data, "tolerance": TOLERANCE,
                "checked_against": "transformers on the same inputs"}


def convert(folder: Path, summary: HuggingFaceFolder, output: Path, *, label: str,
            progress: Progress) -> HuggingFaceConversion:
    """Export the folder's model into the empty folder `output` (model.onnx and perhaps its data, tokenizer.json)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # progress bars on the worker's stderr say nothing

    torch.manual_seed(0)
    progress(0.05, "loading the model with transformers")
    model = _load_model(folder, summary, label)
    tokenizer = None if summary.image else _load_tokenizer(folder, label)
    config = model.config
    if tokenizer is not None and len(tokenizer) > int(config.vocab_size):
        raise InvalidContent(f"{label}: the tokenizer has {len(tokenizer)} tokens and the model's vocabulary "
                             f"{config.vocab_size}: they do not belong together")
    wrapper, names = _wrap(model, summary, tokenizer)
    feeds = _examples(summary, tokenizer, config, names)
    with torch.no_grad():
        reference = wrapper(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    output.mkdir(parents=True, exist_ok=True)
    onnx_path = output / "model.onnx"
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    external = parameters > EXTERNAL_FROM_BYTES
    progress(0.3, "exporting to ONNX")
    exporter = _export(wrapper, feeds, names, onnx_path, external,
                       "embeddings" if summary.task == "embeddings" else "logits")
    progress(0.8, "checking ONNX against transformers")
    error, cosine = _check(onnx_path, feeds, reference, label)
    tokenizer_path = None
    if tokenizer is not None:
        tokenizer_path = output / "tokenizer.json"
        tokenizer.backend_tokenizer.save(str(tokenizer_path))
    max_length = _max_length(tokenizer, config)
    settings = TextSettings(
        task=summary.task, inputs=names,
        max_length=min(max_length, summary.max_length) if summary.max_length else max_length,
        pad_id=int(tokenizer.pad_token_id) if tokenizer is not None and tokenizer.pad_token_id is not None else 0,
        labels={str(k): str(v) for k, v in (config.id2label or {}).items()} if summary.task != "embeddings" else {},
        dimensions=int(reference.shape[-1]) if summary.task == "embeddings" else None,
        image=_image_settings(folder, config) if summary.image else None,
    )
    return HuggingFaceConversion(onnx_path, tokenizer_path, settings, error, cosine, int(reference.shape[0]),
                                 exporter, external)


def _load_model(folder: Path, summary: HuggingFaceFolder, label: str) -> Any:
    import transformers

    prefix = MODEL_TYPES[summary.model_type]
    head = {"embeddings": "Model", "classification": "ForImageClassification" if summary.image else
            "ForSequenceClassification", "token-classification": "ForTokenClassification"}[summary.task]
    cls = getattr(transformers, f"{prefix}{head}", None)
    if cls is None:
        raise InvalidContent(f"{label}: transformers has no class {prefix}{head}")
    safetensors = any(w.endswith(".safetensors") for w in summary.weights)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                        use_safetensors=safetensors, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InvalidContent(f"{label}: transformers cannot load the model: {str(exc).splitlines()[0][:300]}") \
            from None
    return model.eval()


def _load_tokenizer(folder: Path, label: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                      use_fast=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidContent(f"{label}: the tokenizer cannot be loaded: {str(exc).splitlines()[0][:300]}",
                             code="no_tokenizer") from None
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidContent(f"{label}: the tokenizer has no fast (tokenizers) form, so it cannot be served "
                             "without transformers", code="no_tokenizer")
    return tokenizer


def _wrap(model: Any, summary: HuggingFaceFolder, tokenizer: Any) -> tuple[Any, list[str]]:
    import inspect

    import torch

    if summary.image:
        names = ["pixel_values"]
    else:
        accepted = set(inspect.signature(model.forward).parameters)
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted
                 and n in tokenizer.model_input_names + ["attention_mask"]]

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            feeds = dict(zip(names, tensors, strict=True))
            result = self.model(**feeds, return_dict=True)
            if summary.task != "embeddings":
                logits: torch.Tensor = result.logits
                return logits
            if summary.image:
                pooled = getattr(result, "pooler_output", None)
                vector = pooled if pooled is not None else result.last_hidden_state[:, 0]
            else:
                vector = _pool(result.last_hidden_state, feeds["attention_mask"], summary.pooling or "mean")
            return torch.nn.functional.normalize(vector, dim=-1) if summary.normalize else vector

    return Wrapper().eval(), names


def _pool(tokens: Any, mask: Any, mode: str) -> Any:
    import torch

    if mode == "cls":
        return tokens[:, 0]
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    if mode == "max":
        return torch.where(weights > 0, tokens, torch.full_like(tokens, -1e9)).max(dim=1).values
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _examples(summary: HuggingFaceFolder, tokenizer: Any, config: Any, names: list[str]) -> dict[str, np.ndarray]:
    if summary.image:
        size = int(getattr(config, "image_size", 224))
        channels = int(getattr(config, "num_channels", 3))
        pixels = np.random.default_rng(0).standard_normal((3, channels, size, size)).astype(np.float32)
        return {"pixel_values": pixels}
    encoded = tokenizer(CHECK_TEXTS, padding=True, truncation=True, max_length=_max_length(tokenizer, config),
                        return_tensors="np")
    return {name: np.asarray(encoded[name], dtype=np.int64) for name in names}


def _export(wrapper: Any, feeds: dict[str, np.ndarray], names: list[str], path: Path, external: bool,
            output: str) -> str:
    import torch

    example = tuple(torch.from_numpy(feeds[n]) for n in names)
    axes = {n: ({0: "batch"} if n == "pixel_values" else {0: "batch", 1: "sequence"}) for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not external:
            torch.onnx.export(wrapper, example, str(path), dynamo=False, input_names=names, output_names=[output],
                              dynamic_axes={**axes, output: {0: "batch"}}, opset_version=OPSET)
            return f"torch.onnx (TorchScript), opset {OPSET}"
        shapes = (dict.fromkeys(axes[n], torch.export.Dim.DYNAMIC) for n in names)
        program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names, output_names=[output],
                                    dynamic_shapes=(tuple(shapes),), opset_version=18)
        assert program is not None  # the dynamo exporter returns its program
        program.save(str(path), external_data=True)
        return "torch.onnx (dynamo), opset 18, external data"


def _check(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray, label: str) -> tuple[float, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    if got.shape != reference.shape:
        raise InvalidContent(f"{label}: the ONNX export answers shape {got.shape}, transformers {reference.shape}")
    error = float(np.max(np.abs(got - reference)))
    flat_a, flat_b = got.reshape(len(got), -1).astype(np.float64), reference.reshape(len(got), -1).astype(np.float64)
    cosine = float(np.min(np.sum(flat_a * flat_b, 1) / np.maximum(
        np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1), 1e-12)))
    scale = max(float(np.max(np.abs(reference))), 1.0)
    if error > TOLERANCE * scale * 10:
        raise InvalidContent(f"{label}: the ONNX export differs from transformers by {error:.3g}; not published")
    return error, cosine


def _max_length(tokenizer: Any, config: Any) -> int:
    positions = int(getattr(config, "max_position_embeddings", 512) or 512)
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "mpnet"):
        positions -= 2  # their position ids start after the padding index
    declared = int(getattr(tokenizer, "model_max_length", positions) or positions) if tokenizer is not None \
        else positions
    return max(1, min(declared, positions))


def _image_settings(folder: Path, config: Any) -> dict[str, Any]:
    from app.formats.huggingface import read_json

    processor = folder / "preprocessor_config.json"
    settings = read_json(processor, "the folder") if processor.is_file() else {}
    return {"size": int(getattr(config, "image_size", 224)), "channels": int(getattr(config, "num_channels", 3)),
            "image_mean": settings.get("image_mean"), "image_std": settings.get("image_std"),
            "rescale_factor": settings.get("rescale_factor"), "processor": bool(settings)}
