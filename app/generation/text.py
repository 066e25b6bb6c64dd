"""Generated tokens as text: decoded incrementally (valid UTF-8 only), with stop strings cut."""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class IncrementalDecoder:
    """Text of each new token, as the whole sequence decodes.

    A byte-level BPE token may hold part of a character; decoding it alone gives U+FFFD, and a streaming decoder
    that drops such pieces loses text. The window from the last clean boundary is decoded again instead, and
    text is released once it no longer ends in an incomplete character (as vLLM and TGI detokenize).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._released = ""
        """The text of ids[prefix:read], already sent: kept so that each token decodes one window, not two."""

    def _decode(self, start: int, stop: int | None = None) -> str:
        return str(self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=True))

    def add(self, token: int) -> str:
        self._ids.append(token)
        now = self._decode(self._prefix)
        if len(now) <= len(self._released) or now.endswith(_INCOMPLETE):
            return ""
        piece = now[len(self._released):]
        self._prefix, self._read = self._read, len(self._ids)
        self._released = self._decode(self._prefix, self._read)
        return piece

    def flush(self) -> str:
        """What is left at the end, incomplete characters included (as a full decode shows them)."""
        now = self._decode(self._prefix)
        piece = now[len(self._released):]
        self._prefix = self._read = len(self._ids)
        self._released = ""
        return piece


class StopText:
    """Generated text with the stop strings cut: a tail that could still begin a stop string is held back."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._pending = ""
        self.emitted = ""

    def add(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string was reached)."""
        self._pending += piece
        if not self._stops:
            return self._release(len(self._pending)), False
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            ready = self._release(min(hits))
            self._pending = ""
            return ready, True
        hold = max((_overlap(self._pending, s) for s in self._stops), default=0)
        return self._release(len(self._pending) - hold), False

    def flush(self) -> str:
        return self._release(len(self._pending))

    def _release(self, count: int) -> str:
        ready, self._pending = self._pending[:count], self._pending[count:]
        self.emitted += ready
        return ready


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that begins `stop`."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0

