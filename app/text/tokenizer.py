"""Tokenization on the server with a model's own `tokenizer.json` (the `tokenizers` library, no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

# Sequences are padded to a multiple of this: requests of similar lengths then share a shape and batch together.
PAD_TO_MULTIPLE = 16
# A group of texts padded together grows while its longest is at most this many times its shortest.
GROUP_SPREAD = 1.5


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
        return self._padded(self._tokenizer.encode_batch(texts, add_special_tokens=True), pad_to_multiple)

    def encode_grouped(self, texts: list[str], spread: float = GROUP_SPREAD) -> list[tuple[list[int], Encoded]]:
        """The texts in groups of similar length, each padded to its own longest: [(indexes into texts, Encoded)].

        One padded batch of 32 sentences of 10-40 words computes about 4 tokens for every real one (a long
        sentence sets every row's length); sorted by length, a group grows while its longest stays within
        `spread` times its shortest (both rounded up to PAD_TO_MULTIPLE)."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda index: len(encodings[index].ids))
        groups: list[list[int]] = []
        for index in order:
            if groups and self._rounded(len(encodings[index].ids)) <= spread * self._rounded(
                    len(encodings[groups[-1][0]].ids)):
                groups[-1].append(index)
            else:
                groups.append([index])
        return [(group, self._padded([encodings[i] for i in group], PAD_TO_MULTIPLE)) for group in groups]

    def merged(self, groups: list[tuple[list[int], Encoded]]) -> Encoded:
        """The groups as one Encoded in the texts' own order, feeds padded to the longest group."""
        count = sum(len(indexes) for indexes, _ in groups)
        length = max(next(iter(e.feeds.values())).shape[1] for _, e in groups)
        feeds = {name: np.full((count, length), self.pad_id if name == "input_ids" else 0, dtype=np.int64)
                 for name in self.inputs}
        tokens = [0] * count
        offsets: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        special: list[list[bool]] = [[] for _ in range(count)]
        truncated: list[int] = []
        for indexes, encoded in groups:
            for name, array in encoded.feeds.items():
                feeds[name][indexes, :array.shape[1]] = array
            for row, index in enumerate(indexes):
                tokens[index], offsets[index], special[index] = encoded.tokens[row], encoded.offsets[row], \
                    encoded.special[row]
            truncated += [indexes[row] for row in encoded.truncated]
        return Encoded(feeds, tokens, sorted(truncated), offsets, special)

    def _rounded(self, count: int) -> int:
        return min(self.max_length, -(-count // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE)

    def _padded(self, encodings: list[Any], pad_to_multiple: int) -> Encoded:
        truncated = [index for index, encoding in enumerate(encodings) if encoding.overflowing]
        longest = max(len(e.ids) for e in encodings)
        length = min(self.max_length, -(-longest // pad_to_multiple) * pad_to_multiple) if pad_to_multiple > 1 \
            else longest
        ids = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            count = len(encoding.ids)
            ids[row, :count] = encoding.ids
            mask[row, :count] = 1
            types[row, :count] = encoding.type_ids
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return Encoded(
            feeds={name: available[name] for name in self.inputs},
            tokens=[len(e.ids) for e in encodings], truncated=truncated,
            offsets=[[tuple(o) for o in e.offsets] for e in encodings],
            special=[[bool(s) for s in e.special_tokens_mask] for e in encodings],
        )
