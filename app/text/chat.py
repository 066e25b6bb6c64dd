"""Chat templates: the model folder's own Jinja template, rendered in a sandbox.

A template comes from the upload, so it runs in jinja2's immutable sandbox: no attribute access to Python
internals, no mutation of the values it is given, no imports, and a bound on the size of what it renders.
The globals are those transformers gives templates (`raise_exception`, `strftime_now`, the `tojson` filter),
so the templates Hugging Face folders ship render here as they do there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from app.errors import InvalidContent, InvalidInput

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_RENDERED_CHARACTERS = 4_000_000
# What a template is checked on at upload: with a system message, and without (some templates refuse one).
_SAMPLE_CONVERSATIONS = (
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hi. How can I help?"}, {"role": "user", "content": "Say one word."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
     {"role": "user", "content": "Say one word."}],
)


class TemplateRefused(Exception):
    """A template called raise_exception: it refuses this conversation (say, a role it does not take)."""


def _raise_exception(message: str) -> NoReturn:
    raise TemplateRefused(str(message)[:300])


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(str(format_string))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # As transformers' filter: plain JSON, not jinja2's HTML-escaped form.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "_template", _compile(self.source))

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of these messages (already checked by `check_messages`); 400 when the template
        refuses them."""
        try:
            text = str(self._template.render(  # type: ignore[attr-defined]
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                eos_token=self.eos_token))
        except TemplateRefused as exc:
            raise InvalidInput(f"the model's chat template refuses these messages: {exc}") from None
        except Exception as exc:  # a sandbox violation or a template bug, found on these messages
            raise InvalidInput(f"the model's chat template failed on these messages: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from None
        if len(text) > MAX_RENDERED_CHARACTERS:
            raise InvalidInput(f"the chat template rendered {len(text)} characters; the limit is "
                               f"{MAX_RENDERED_CHARACTERS}")
        return text


def _compile(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.filters["tojson"] = _tojson
    try:
        return environment.from_string(source)
    except TemplateError as exc:
        raise InvalidContent(f"the chat template does not compile: {exc}", code="invalid_chat_template") from None


def check_template(source: str, *, bos_token: str, eos_token: str, label: str) -> ChatTemplate:
    """A template that renders a usual conversation, or 422 at upload (not at the first request)."""
    template = ChatTemplate(source, bos_token, eos_token)
    failures = []
    for conversation in _SAMPLE_CONVERSATIONS:
        try:
            rendered = template.render(conversation)
        except InvalidInput as exc:
            failures.append(exc.message)
            continue
        if "Say one word." not in rendered:
            failures.append("the rendered prompt does not contain the last user message")
            continue
        return template
    raise InvalidContent(f"{label}: the chat template cannot render a conversation of system, user and assistant "
                         f"messages: {failures[-1]}", code="invalid_chat_template")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI chat messages as a template takes them: a role from ROLES and text content; 400 naming the first
    that is not."""
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidInput(f"messages[{index}] is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidInput(f"messages[{index}].role is {str(role)[:40]!r}; roles: {', '.join(ROLES)}")
        checked.append({**message, "content": _text_content(message.get("content"), index)})
    return checked


def _text_content(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI's content parts: only text parts can be served
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidInput(f"messages[{index}].content has a part of type {str(kind)[:40]!r}; this model "
                                   "takes text parts only")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidInput(f"messages[{index}].content must be a string or a list of text parts")
