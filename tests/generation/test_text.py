"""Generated text as clients see it: incremental decoding of a real byte-level BPE tokenizer, stop strings,
sampling parameters, and chat templates in the sandbox."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from app.errors import InvalidContent, InvalidInput
from app.generation.sampling import parse_sampling
from app.generation.text import IncrementalDecoder, StopText
from app.text.chat import ChatTemplate, check_messages, check_template
from tests.exports import llm_folders


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(llm_folders() / "llama" / "tokenizer.json"))


def _stream(tokenizer: Tokenizer, ids: list[int]) -> str:
    decoder = IncrementalDecoder(tokenizer)
    return "".join(decoder.add(t) for t in ids) + decoder.flush()


def test_streamed_text_equals_the_whole_decode(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    text = "Ünïcödé — 日本語の文 and emoji 🙂 in code: def f(x): return x ** 2\n"
    for ids in [tokenizer.encode(text).ids, *([rng.randrange(3, tokenizer.get_vocab_size()) for _ in range(60)]
                                            for _ in range(50))]:
        assert _stream(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_no_piece_ends_inside_a_character(tokenizer: Tokenizer) -> None:
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.add(t) for t in tokenizer.encode("日本語 🙂 ü").ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "日本語 🙂 ü"


def test_stop_strings_are_cut_and_held_back_until_they_cannot_match() -> None:
    text = StopText(("END", "\n\n"))
    assert text.add("hello E") == ("hello ", False)  # "E" may begin END
    assert text.add("N") == ("", False)
    assert text.add("Dless") == ("", True)
    assert text.emitted == "hello "
    other = StopText(("END",))
    assert other.add("ENtry") == ("ENtry", False)
    assert other.flush() == "" and other.emitted == "ENtry"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abE\nND", max_size=4), max_size=12), st.sampled_from(["END", "a\n", "bb"]))
def test_stops_match_a_cut_of_the_whole_text(pieces: list[str], stop: str) -> None:
    text = StopText((stop,))
    sent, stopped = "", False
    for piece in pieces:
        ready, stopped = text.add(piece)
        sent += ready
        if stopped:
            break
    if not stopped:
        sent += text.flush()
    whole = "".join(pieces)
    assert sent == (whole[:whole.index(stop)] if stop in whole else whole)
    assert stopped == (stop in whole)


@pytest.mark.parametrize(("body", "needle"), [
    ({"temperature": -1}, "'temperature'"), ({"temperature": "hot"}, "'temperature' must be a number"),
    ({"max_tokens": 0}, "'max_tokens' must be at least 1"), ({"max_tokens": True}, "'max_tokens' must be an integer"),
    ({"top_p": 0}, "'top_p' must be greater than 0"), ({"top_k": -1}, "'top_k'"), ({"seed": -5}, "'seed'"),
    ({"n": 3}, "'n' must be 1"), ({"stop": [1]}, "'stop'"), ({"stop": ""}, "'stop'"), ({"echo": True}, "'echo'"),
    ({"logprobs": 2}, "'logprobs'"),
])
def test_bad_sampling_settings_name_the_field(body: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle):
        parse_sampling(body, default_max_tokens=16)


def test_sampling_defaults_and_greedy() -> None:
    assert parse_sampling({}, default_max_tokens=16).max_tokens == 16
    assert parse_sampling({}, default_max_tokens=None).max_tokens is None
    assert parse_sampling({"temperature": 0}, default_max_tokens=16).greedy
    assert parse_sampling({"top_k": 1}, default_max_tokens=16).greedy
    assert parse_sampling({"stop": "x", "max_completion_tokens": 5}, default_max_tokens=16).stop == ("x",)


def test_chat_templates_render_in_the_sandbox() -> None:
    template = check_template("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content | tojson }}\n"
                              "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
                              bos_token="<s>", eos_token="</s>", label="the folder")
    rendered = template.render([{"role": "user", "content": "Say one word: \"é\""}])
    assert rendered == '<s>[user] "Say one word: \\"é\\""\n[assistant]'
    escaping = ChatTemplate("{{ messages.__class__.__mro__ }}{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(InvalidInput, match="SecurityError|failed"):
        escaping.render([{"role": "user", "content": "x"}])
    mutating = ChatTemplate("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}")
    with pytest.raises(InvalidInput):
        mutating.render([{"role": "user", "content": "x"}])
    with pytest.raises(InvalidContent, match="does not compile"):
        check_template("{% for %}", bos_token="", eos_token="", label="the folder")
    no_system = check_template("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system') }}"
                               "{% endif %}{{ m.content }}{% endfor %}", bos_token="", eos_token="", label="x")
    with pytest.raises(InvalidInput, match="no system"):
        no_system.render([{"role": "system", "content": "s"}])


def test_messages_are_checked() -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    parts = check_messages([{"role": "user", "content": content}])
    assert parts[0]["content"] == "ab"
    for bad, needle in (([{"role": "robot", "content": "x"}], "robot"), ([], "non-empty"),
                        ([{"role": "user", "content": 5}], "string or a list"), (["hi"], "not an object")):
        with pytest.raises(InvalidInput, match=needle):
            check_messages(bad)
