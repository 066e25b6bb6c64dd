"""Text models: the interface clients see (a BYTES `text` input), tokenizers loaded once, answers per task."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import InvalidInput
from app.runtime.datatypes import TensorSpec
from app.storage.artifacts import ArtifactStore
from app.text import answers
from app.text.tokenizer import Encoded, TextTokenizer

TOKENIZER_SUFFIX = ".tok"
MAX_TEXT_CHARACTERS = 1_000_000
"""One text longer than this is refused (it would be cut at the model's maximum length anyway)."""


def text_interface(settings: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) a text model shows: `text` in; embeddings, label and scores, or entities out."""
    inputs = [TensorSpec("text", "BYTES", (-1,))]
    task = settings["task"]
    if task == "embeddings":
        return inputs, [TensorSpec("embeddings", "FP32", (-1, int(settings.get("dimensions") or -1)))]
    if task == "classification":
        return inputs, [TensorSpec("label", "BYTES", (-1,)), TensorSpec("scores", "FP32", (-1, len(
            settings.get("labels") or {}) or -1))]
    return inputs, [TensorSpec("entities", "BYTES", (-1,))]


def generation_interface() -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) a generation model shows over V2, as Triton's LLM backends: a prompt in, text out."""
    return [TensorSpec("text_input", "BYTES", (1,))], [TensorSpec("text_output", "BYTES", (1,))]


@dataclass
class TextAnswer:
    names: list[str]
    arrays: list[np.ndarray]
    warnings: list[str]
    prompt_tokens: int


class TextModels:
    """Tokenizers by their artifact hash, loaded on first use and kept (a few MB each)."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        self._tokenizers: dict[str, TextTokenizer] = {}
        self._lock = threading.Lock()

    def tokenizer(self, settings: dict[str, Any]) -> TextTokenizer:
        sha = str(settings["tokenizer_sha256"])
        with self._lock:
            found = self._tokenizers.get(sha)
        if found is None:
            found = TextTokenizer(self._store.local(sha, TOKENIZER_SUFFIX), inputs=list(settings["inputs"]),
                                  max_length=int(settings["max_length"]), pad_id=int(settings["pad_id"]))
            with self._lock:
                self._tokenizers[sha] = found
        return found

    def encode(self, settings: dict[str, Any], values: np.ndarray | list[Any]) -> tuple[list[str], Encoded]:
        texts = decode_texts(values)
        return texts, self.tokenizer(settings).encode(texts)

    def encode_grouped(self, settings: dict[str, Any],
                       values: np.ndarray | list[Any]) -> tuple[list[str], list[tuple[list[int], Encoded]]]:
        """The texts in groups of similar length, each padded to its own longest (see TextTokenizer)."""
        texts = decode_texts(values)
        return texts, self.tokenizer(settings).encode_grouped(texts)

    @staticmethod
    def answer(settings: dict[str, Any], texts: list[str], encoded: Encoded, raw: np.ndarray) -> TextAnswer:
        task = settings["task"]
        labels = {str(k): str(v) for k, v in (settings.get("labels") or {}).items()}
        if task == "embeddings":
            names, arrays = ["embeddings"], [raw.astype(np.float32, copy=False)]
        elif task == "classification":
            label, scores = answers.classification(raw, labels)
            names, arrays = ["label", "scores"], [label, scores]
        else:
            names, arrays = ["entities"], [answers.entities(raw, encoded, texts, labels)]
        warnings = [f"text {index} is longer than the model's maximum of {settings['max_length']} tokens and was "
                    "truncated" for index in encoded.truncated]
        return TextAnswer(names, arrays, warnings, sum(encoded.tokens))


def decode_texts(values: np.ndarray | list[Any]) -> list[str]:
    """UTF-8 texts from a BYTES tensor or a JSON list; 400 naming the first that is not one."""
    items = list(np.asarray(values, dtype=object).reshape(-1)) if isinstance(values, np.ndarray) else list(values)
    if not items:
        raise InvalidInput("'text' is empty: send at least one text")
    texts = []
    for index, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"text {index} is not valid UTF-8 (byte {exc.start})") from None
        if not isinstance(item, str):
            raise InvalidInput(f"text {index} is not a string")
        if len(item) > MAX_TEXT_CHARACTERS:
            raise InvalidInput(f"text {index} has {len(item)} characters; the limit is {MAX_TEXT_CHARACTERS}")
        texts.append(item)
    return texts
