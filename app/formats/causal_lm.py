"""Decoder-only LLM folders (`*ForCausalLM`), vetted in the server from their JSON: the architecture the
onnxruntime-genai model builder converts, a context the server can hold, and a chat template that renders.

Nothing here imports transformers or the builder: the conversion runs in the worker (`genai_build`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidContent
from app.text.chat import check_template

# model_type -> the architecture onnxruntime-genai's builder converts (0.18) and transformers ships.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "granite": "GraniteForCausalLM", "olmo": "OlmoForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
MAX_TEMPLATE_CHARACTERS = 256 * 1024


@dataclass(frozen=True)
class CausalLM:
    architecture: str
    model_type: str
    context_length: int
    chat_template: str | None
    bos_token: str
    eos_token: str


def is_causal_lm(config: dict[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    named = [str(a) for a in architectures] if isinstance(architectures, list) else []
    return any(a.endswith("ForCausalLM") for a in named) or (not named and config.get("model_type") in ARCHITECTURES)


def inspect(root: Path, config: dict[str, Any], *, label: str, max_context: int) -> CausalLM:
    """The LLM the folder holds, or 422 naming what the server cannot serve."""
    from app.formats.huggingface import read_json

    model_type = str(config.get("model_type", ""))[:64]
    architectures = config.get("architectures") or []
    architecture = str(architectures[0])[:80] if isinstance(architectures, list) and architectures else ""
    expected = ARCHITECTURES.get(model_type)
    if expected is None or architecture not in ("", expected):
        supported = ", ".join(sorted(ARCHITECTURES.values()))
        raise InvalidContent(f"{label}: the causal LM '{architecture or model_type}' is not one SlimServe "
                             f"converts for generation; supported: {supported}", code="unsupported_architecture")
    context = _context_length(config, label)
    if context > max_context:
        raise InvalidContent(f"{label}: config.json claims a context of {context} tokens; this server serves "
                             f"contexts up to {max_context} (SLIMSERVE_MAX_CONTEXT_TOKENS)", code="context_too_long")
    tokenizer_config = read_json(root / "tokenizer_config.json", label) \
        if (root / "tokenizer_config.json").is_file() else {}
    if not isinstance(tokenizer_config, dict):
        raise InvalidContent(f"{label}: tokenizer_config.json is not a JSON object")
    bos, eos = _token(tokenizer_config.get("bos_token")), _token(tokenizer_config.get("eos_token"))
    source = _template_source(root, tokenizer_config, label)
    if source is not None:
        check_template(source, bos_token=bos, eos_token=eos, label=label)
    return CausalLM(architecture=expected, model_type=model_type, context_length=context, chat_template=source,
                    bos_token=bos, eos_token=eos)


def _context_length(config: dict[str, Any], label: str) -> int:
    for field in _CONTEXT_FIELDS:
        value = config.get(field)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise InvalidContent(f"{label}: config.json's '{field}' must be an integer of at least 2")
            return value
    raise InvalidContent(f"{label}: config.json names no context length ({', '.join(_CONTEXT_FIELDS)})")


def _token(value: Any) -> str:
    if isinstance(value, dict):  # tokenizer_config.json may spell a special token as an AddedToken object
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _template_source(root: Path, tokenizer_config: dict[str, Any], label: str) -> str | None:
    """The chat template: `chat_template.jinja` (transformers 4.43+), else tokenizer_config.json's (a string, or
    named templates of which 'default' serves)."""
    path = root / "chat_template.jinja"
    if path.is_file():
        if path.stat().st_size > MAX_TEMPLATE_CHARACTERS:
            raise InvalidContent(f"{label}: chat_template.jinja is larger than {MAX_TEMPLATE_CHARACTERS} bytes")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidContent(f"{label}: chat_template.jinja is not UTF-8 text") from None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {str(t.get("name")): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        return None
    if not isinstance(template, str):
        raise InvalidContent(f"{label}: tokenizer_config.json's 'chat_template' must be a string")
    if len(template) > MAX_TEMPLATE_CHARACTERS:
        raise InvalidContent(f"{label}: the chat template is longer than {MAX_TEMPLATE_CHARACTERS} characters")
    return template
