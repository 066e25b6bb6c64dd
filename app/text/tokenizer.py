"""Tokenization on the server with a model's own `tokenizer.json` (the `tokenizers` library, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

# Sequences are padded to a multiple of this: requests of similar lengths then share a shape and batch together.
PAD_TO_MULTIPLE = 16


@dataclass
class Encoded:
    feeds: dict[str, np.ndarray]
    """The model's token inputs, [texts, padded length], int64."""
    tokens: list[int]
    """Tokens per text (before padding), for usage counts."""
    truncated: list[int]
    """Indexes of the texts cut at the model's maximum length."""
    offsets: list[list[tuple[int, int]]]
    """Character span of every token of every text (for token classification)."""
    special: list[list[bool]]


class TextTokenizer:
    """Batch encoding with padding and truncation as the model was trained, from its tokenizer.json."""

    def __init__(self, path: Path, *, inputs: list[str], max_length: int, pad_id: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()  # done here: to a multiple of PAD_TO_MULTIPLE, for batching
        # truncation inside the tokenizer keeps the special tokens its post-processor adds ([SEP], </s>)
        self._tokenizer.enable_truncation(max_length)
        self.inputs = inputs
        self.max_length = max_length
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, texts: list[str], pad_to_multiple: int = PAD_TO_MULTIPLE) -> Encoded:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        truncated = [index for index, encoding in enumerate(encodings) if encoding.overflowing]
        longest = max(len(e.ids) for e in encodings)
        length = min(self.max_length, -(-longest // pad_to_multiple) * pad_to_multiple) if pad_to_multiple > 1 \
            else longest
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), length), dtype=np.int64)
        types = np.zeros((len(texts), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            count = len(encoding.ids)
            ids[row, :count] = encoding.ids
            mask[row, :count] = 1
            types[row, :count] = encoding.type_ids
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Encoded(
            feeds={name: available[name] for name in self.inputs},
            tokens=[len(e.ids) for e in encodings], truncated=truncated,
            offsets=[[tuple(o) for o in e.offsets] for e in encodings],  # type: ignore[misc]
            special=[[bool(s) for s in e.special_tokens_mask] for e in encodings],
        )
