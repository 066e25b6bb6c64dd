"""Teacher-forced logits of an onnxruntime-genai model folder, with plain onnxruntime.

A genai folder's decoder takes `input_ids`, `attention_mask` and one past key and value per layer; with an
empty past it scores a whole sequence in one run. That is what perplexity, KL divergence and next-token
agreement need, and what the conversion check compares with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

GENAI_CONFIG = "genai_config.json"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def genai_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / GENAI_CONFIG).read_text())
    return config


class DecoderSession:
    """The folder's decoder as an onnxruntime session that scores one token sequence at a time."""

    def __init__(self, folder: Path, *, threads: int = 1) -> None:
        import onnxruntime as ort

        decoder = genai_config(folder)["model"]["decoder"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / decoder["filename"]), options,
                                            providers=["CPUExecutionProvider"])
        self._layers = int(decoder["num_hidden_layers"])
        self._kv_heads = int(decoder["num_key_value_heads"])
        self._head_size = int(decoder["head_size"])
        names = decoder["inputs"]
        self._past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self._layers)]
        types = {i.name: i.type for i in self.session.get_inputs()}
        self._past_type = _NUMPY_TYPES.get(types.get(self._past[0][0], "tensor(float)"), np.float32)
        self._has_positions = "position_ids" in types
        self._logits = decoder["outputs"]["logits"]

    def logits(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """[len(ids), vocab] float32: the next-token logits after each prefix of `ids`."""
        result = self.session.run([self._logits], self.feeds(ids))[0]
        return np.asarray(result[0], dtype=np.float32)

    def feeds(self, ids: np.ndarray | list[int]) -> dict[str, np.ndarray]:
        """The decoder's inputs that score `ids` from an empty past."""
        tokens = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        feeds: dict[str, np.ndarray] = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
        if self._has_positions:
            feeds["position_ids"] = np.arange(tokens.shape[1], dtype=np.int64).reshape(1, -1)
        empty = np.zeros((1, self._kv_heads, 0, self._head_size), dtype=self._past_type)
        for key, value in self._past:
            feeds[key] = feeds[value] = empty
        return feeds
