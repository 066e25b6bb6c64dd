"""What a text model answers, per task, from its raw ONNX outputs."""

from __future__ import annotations

import json

import numpy as np

from app.text.tokenizer import Encoded


def classification(logits: np.ndarray, labels: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(label per text as an object array of str, softmax scores [texts, classes] float32)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    scores = np.exp(shifted)
    scores /= scores.sum(axis=1, keepdims=True)
    names = np.array([labels.get(str(int(i)), str(int(i))) for i in scores.argmax(axis=1)], dtype=object)
    return names, scores.astype(np.float32)


def entities(logits: np.ndarray, encoded: Encoded, texts: list[str], labels: dict[str, str]) -> np.ndarray:
    """Per text, a JSON list of the tokens given a label other than 'O': label, score, character span, word."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    answers = []
    for row, text in enumerate(texts):
        found = []
        for position, (start, end) in enumerate(encoded.offsets[row][:encoded.tokens[row]]):
            if encoded.special[row][position] or end <= start:
                continue
            best = int(probabilities[row, position].argmax())
            label = labels.get(str(best), str(best))
            if label == "O":
                continue
            found.append({"entity": label, "score": round(float(probabilities[row, position, best]), 5),
                          "start": int(start), "end": int(end), "word": text[start:end]})
        answers.append(json.dumps(found, ensure_ascii=False))
    return np.array(answers, dtype=object)
