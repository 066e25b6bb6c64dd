"""Text datasets: `.txt` (one text per line) and `.jsonl` (`{"text": ..., "label": ...}` per line), kept as text
and tokenized with the model's own tokenizer when a job uses them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.errors import InvalidContent
from app.text.tokenizer import TextTokenizer

TEXT = "text"
LABELS = "labels"
MAX_TEXTS = 1_000_000
MAX_CHARACTERS = 1_000_000


def parse_text_file(path: Path, *, label: str, labels: dict[str, str]) -> tuple[list[str], np.ndarray | None]:
    """(texts, label ids or None); `labels` is the model's id -> name map, for labels given by name."""
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidContent(f"{label} is not UTF-8 text (byte {exc.start})") from None
    lines = [line for line in content.splitlines() if line.strip()]
    if not lines:
        raise InvalidContent(f"{label} holds no text")
    if len(lines) > MAX_TEXTS:
        raise InvalidContent(f"{label} holds {len(lines)} texts; the limit is {MAX_TEXTS}")
    if not lines[0].lstrip().startswith("{"):
        texts = [line.rstrip("\r") for line in lines]
        found = None
    else:
        texts, found = _jsonl(lines, label, labels)
    for index, text in enumerate(texts):
        if len(text) > MAX_CHARACTERS:
            raise InvalidContent(f"{label}: text {index + 1} has {len(text)} characters; the limit is {MAX_CHARACTERS}")
    return texts, found


def _jsonl(lines: list[str], label: str, labels: dict[str, str]) -> tuple[list[str], np.ndarray | None]:
    by_name = {name: int(index) for index, name in labels.items()}
    texts: list[str] = []
    values: list[int] = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidContent(f"{label}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(TEXT), str):
            raise InvalidContent(f"{label}: line {number} has no string 'text'")
        texts.append(record[TEXT])
        if "label" in record:
            value = record["label"]
            if isinstance(value, str):
                if value not in by_name:
                    raise InvalidContent(f"{label}: line {number} has the label {value[:60]!r}, which the model "
                                         f"does not know; its labels: {', '.join(list(by_name)[:20])}")
                value = by_name[value]
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidContent(f"{label}: line {number}: 'label' must be a label name or a class index")
            values.append(value)
        elif values:
            raise InvalidContent(f"{label}: line {number} has no 'label' though earlier lines do")
    if values and len(values) != len(texts):
        raise InvalidContent(f"{label}: the first lines have no 'label' though later ones do")
    return texts, np.array(values, dtype=np.int64) if values else None


def token_arrays(texts: list[str], tokenizer: TextTokenizer) -> tuple[dict[str, np.ndarray], int]:
    """The model's token inputs for every text, padded to the longest (at most the model's maximum length);
    returns them and how many texts were truncated."""
    encoded = tokenizer.encode(texts, pad_to_multiple=1)
    return encoded.feeds, len(encoded.truncated)
