"""Sampling parameters of one generation, checked once for every protocol that asks for one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from app.errors import InvalidInput

MAX_STOP_STRINGS = 4
MAX_STOP_CHARACTERS = 256
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
SAMPLING_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n"})
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None
    """None: up to the context (OpenAI's chat default)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k bound."""
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def parse_sampling(raw: dict[str, Any], *, default_max_tokens: int | None) -> SamplingParams:
    """The sampling fields of a request body (OpenAI's names; Triton's `parameters` use the same), 400 naming
    the first that is wrong."""
    max_tokens = _integer(raw, "max_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _integer(raw, "max_completion_tokens", minimum=1)
    n = _integer(raw, "n", minimum=1)
    if n is not None and n != 1:
        raise InvalidInput("'n' must be 1: one choice per request (send several requests for more)")
    if raw.get("best_of") not in (None, 1):
        raise InvalidInput("'best_of' must be 1 or absent")
    if raw.get("echo"):
        raise InvalidInput("'echo' is not supported")
    if raw.get("logprobs") not in (None, False, 0):
        raise InvalidInput("'logprobs' is not supported")
    temperature = _number(raw, "temperature", 1.0, minimum=0.0, maximum=2.0)
    top_p = _number(raw, "top_p", 1.0, minimum=0.0, maximum=1.0)
    if top_p == 0.0:
        raise InvalidInput("'top_p' must be greater than 0")
    top_k = _integer(raw, "top_k", minimum=0)
    seed = _integer(raw, "seed", minimum=0)
    if seed is not None and seed > _MAX_SEED:
        raise InvalidInput(f"'seed' must be at most {_MAX_SEED}")
    return SamplingParams(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k or 0, seed=seed,
                          stop=_stop(raw.get("stop")))


def _integer(raw: dict[str, Any], name: str, *, minimum: int) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"'{name}' must be an integer")
    if value < minimum:
        raise InvalidInput(f"'{name}' must be at least {minimum}, not {value}")
    return value


def _number(raw: dict[str, Any], name: str, default: float, *, minimum: float, maximum: float) -> float:
    value = raw.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"'{name}' must be a number")
    if not minimum <= value <= maximum:
        raise InvalidInput(f"'{name}' must be between {minimum:g} and {maximum:g}, not {value:g}")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidInput("'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidInput(f"'stop' takes at most {MAX_STOP_STRINGS} strings")
    if any(not s or len(s) > MAX_STOP_CHARACTERS for s in stops):
        raise InvalidInput(f"each 'stop' string must have 1 to {MAX_STOP_CHARACTERS} characters")
    return tuple(stops)


def refuse_unknown(given: Iterable[str], allowed: Iterable[str], what: str) -> None:
    """A 400 naming (up to five of) the names in `given` that are not `allowed`, e.g. what="field"."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown {what}(s): {', '.join(repr(u[:40]) for u in unknown[:5])}",
                           code="unknown_parameter")
