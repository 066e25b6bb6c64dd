"""Decoder LLMs through the real server: Hugging Face folders converted by onnxruntime-genai's builder, served
over OpenAI's API (its own client) and Triton's generate extension, greedy output equal to transformers', the
sampling settings, streaming, the concurrency bound, a client that goes away, and what must be refused."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.folders import settled as _settled
from tests.e2e.folders import upload_folder as _upload
from tests.exports import llm_folders
from tests.processes import Server, start_server

pytestmark = pytest.mark.e2e

MODELS = ("llama", "qwen2", "llama-long")
PROMPT = "def main(args):\n    "
MAX_GENERATIONS = 4


@pytest.fixture(scope="module")
def folders() -> Path:
    return llm_folders()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, folders: Path) -> Iterator[Server]:
    started = start_server(tmp_path_factory.mktemp("llm") / "data", SLIMSERVE_EMBEDDED_WORKERS="2",
                           SLIMSERVE_MAX_GENERATIONS=str(MAX_GENERATIONS), SLIMSERVE_MAX_CONTEXT_TOKENS="8192",
                           SLIMSERVE_CAPTURE_FLUSH_SECONDS="0.5")
    try:
        for name in (*MODELS, "llama-square"):
            assert _upload(started.url, name, folders / name).status_code == 201, name
        for name in MODELS:
            model = _settled(started.url, name)
            assert model["state"] == "ready", model
        yield started
    finally:
        started.stop()


def _complete(url: str, model: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, **body}, timeout=120)


def _transformers_greedy(folder: Path, prompt: str, tokens: int) -> tuple[list[int], str, int]:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model.eval()  # type: ignore[no-untyped-call]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=tokens, do_sample=False)[0, len(ids):].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    kept = [t for t in out if t not in eos]
    return kept, str(tokenizer.decode(kept)), len(ids)


def test_conversion_is_checked_against_transformers(server: Server) -> None:
    for name in ("llama", "qwen2"):
        model = httpx.get(f"{server.url}/models/{name}").json()
        conversion = model["conversion"]
        assert conversion["state"] == "succeeded"
        assert conversion["max_abs_error"] < 1e-3
        assert conversion["greedy_match"] is True and conversion["tokenizer_match"] is True
        assert model["task"] == "generation" and model["tokenizer"] is True
        assert model["architecture"] == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[name]
        assert model["generation"] == {"context_length": 256, "chat_template": name == "qwen2",
                                       "eos_token_ids": [2]}
        assert [v["name"] for v in model["variants"]] == ["original"]
        assert model["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]


def test_a_conversion_that_differs_from_transformers_is_not_published(server: Server) -> None:
    # onnxruntime-genai 0.18's builder exports a model whose vocabulary equals its hidden size wrongly
    model = _settled(server.url, "llama-square")
    assert model["state"] == "failed" and model["variants"] == []
    assert "differ from transformers'" in model["error"] and "vocabulary is as large as" in model["error"]
    refused = _complete(server.url, "llama-square", prompt=PROMPT)
    assert refused.status_code == 503 and "failed" in refused.json()["error"]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_equals_transformers(server: Server, folders: Path, name: str) -> None:
    ids, text, prompt_tokens = _transformers_greedy(folders / name, PROMPT, 24)
    answer = _complete(server.url, name, prompt=PROMPT, max_tokens=24, temperature=0).json()
    assert answer["choices"][0]["text"] == text
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                               "total_tokens": prompt_tokens + len(ids)}
    assert answer["choices"][0]["finish_reason"] == ("length" if len(ids) == 24 else "stop")
    again = _complete(server.url, name, prompt=PROMPT, max_tokens=24, temperature=0).json()
    assert again["choices"][0]["text"] == text  # deterministic


def test_openai_client_unchanged(server: Server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=0)
    text = completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    streamed = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in streamed:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == text and reasons[-1] == "length" and set(reasons[:-1]) == {None}
    assert usage is not None and usage.completion_tokens == 12

    messages: Any = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    chat = client.chat.completions.create(model="qwen2", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    content = chat.choices[0].message.content or ""
    deltas = []
    for piece in client.chat.completions.create(model="qwen2", messages=messages, max_tokens=10, temperature=0,
                                                stream=True):
        if piece.choices:
            deltas.append(piece.choices[0].delta.content or "")
    assert "".join(deltas) == content
    ids = {m.id for m in client.models.list()}
    assert {"llama", "qwen2", "llama-long"} <= ids


def test_chat_renders_the_folders_template(server: Server, folders: Path) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folders / "qwen2", local_files_only=True)
    messages = [{"role": "user", "content": "Say hi."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": "qwen2", "messages": messages, "max_tokens": 8, "temperature": 0}).json()
    plain = _complete(server.url, "qwen2", prompt=rendered, max_tokens=8, temperature=0).json()
    assert chat["choices"][0]["message"]["content"] == plain["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] == len(tokenizer(rendered)["input_ids"])


def test_sampling_settings(server: Server) -> None:
    url = server.url
    greedy = _complete(url, "llama", prompt=PROMPT, max_tokens=20, temperature=0).json()["choices"][0]["text"]
    assert _complete(url, "llama", prompt=PROMPT, max_tokens=20, top_k=1).json()["choices"][0]["text"] == greedy

    def sampled(seed: int) -> str:
        body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": seed}
        return str(_complete(url, "llama", **body).json()["choices"][0]["text"])

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)} | {greedy}) > 2

    stop = greedy[5:8]
    assert stop and stop not in greedy[:7]
    cut = _complete(url, "llama", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "never-said"]).json()
    assert cut["choices"][0]["text"] == greedy[:greedy.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    streamed = _stream_text(url, "/v1/completions", {"model": "llama", "prompt": PROMPT, "max_tokens": 20,
                                                     "temperature": 0, "stop": stop, "stream": True})
    assert streamed == greedy[:greedy.index(stop)]


def _stream_text(url: str, path: str, body: dict[str, Any]) -> str:
    pieces = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            pieces.append(event["text_output"] if "text_output" in event else event["choices"][0]["text"])
    return "".join(pieces)


def test_triton_generate_extension(server: Server) -> None:
    url = server.url
    greedy = _complete(url, "llama", prompt=PROMPT, max_tokens=10, temperature=0).json()["choices"][0]["text"]
    answer = httpx.post(f"{url}/v2/models/llama/generate", timeout=60,
                        json={"text_input": PROMPT, "parameters": {"max_tokens": 10, "temperature": 0}}).json()
    assert answer["model_name"] == "llama" and answer["model_version"] == "original"
    assert answer["text_output"] == greedy and answer["finish_reason"] == "length"
    versioned = httpx.post(f"{url}/v2/models/llama/versions/original/generate", timeout=60,
                           json={"text_input": PROMPT, "max_tokens": 10, "temperature": 0}).json()
    assert versioned["text_output"] == greedy
    events = []
    with httpx.stream("POST", f"{url}/v2/models/llama/generate_stream", timeout=60,
                      json={"text_input": PROMPT, "parameters": {"max_tokens": 10, "temperature": 0}}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == greedy
    assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 10
    assert all(e["model_name"] == "llama" for e in events)
    missing = httpx.post(f"{url}/v2/models/llama/versions/int4/generate", json={"text_input": "x"})
    assert missing.status_code == 404


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v1/completions", {"model": "llama", "prompt": "x " * 400}, 400, "context is 256"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "max_tokens": 0}, 400, "'max_tokens' must be at least 1"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "max_tokens": -3}, 400, "'max_tokens'"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "max_tokens": 300}, 400, "past the context"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "temperature": -0.5}, 400, "'temperature'"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "n": 2}, 400, "'n' must be 1"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "top_p": 1.5}, 400, "'top_p'"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "'stop'"),
    ("/v1/completions", {"model": "llama", "prompt": PROMPT, "frobnicate": 1}, 400, "'frobnicate'"),
    ("/v1/completions", {"model": "llama", "prompt": 42}, 400, "'prompt'"),
    ("/v1/completions", {"model": "nobody", "prompt": PROMPT}, 404, "nobody"),
    ("/v1/chat/completions", {"model": "qwen2", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "wizard"),
    ("/v1/chat/completions", {"model": "qwen2", "messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": "qwen2", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "image_url"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}, 400,
     "no chat template"),
    ("/v1/chat/completions", {"model": "qwen2", "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function"}]}, 400, "'tools'"),
    ("/v2/models/llama/generate", {"text_input": PROMPT, "parameters": {"beam_width": 4}}, 400, "'beam_width'"),
    ("/v2/models/llama/generate", {"parameters": {"max_tokens": 4}}, 400, "'text_input'"),
])
def test_bad_requests_are_refused_with_the_reason(server: Server, path: str, body: dict[str, Any], status: int,
                                                  needle: str) -> None:
    response = httpx.post(server.url + path, json=body, timeout=60)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert _complete(server.url, "llama", prompt=PROMPT, max_tokens=2).status_code == 200  # still serving


def _metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _idle(url: str, model: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(url, "slimserve_active_generations", f'model="{model}"'):
        time.sleep(0.05)
    assert _metric(url, "slimserve_active_generations", f'model="{model}"') == 0


def test_a_client_that_goes_away_stops_its_generation(server: Server) -> None:
    labels = 'model="llama-long",variant="original"'
    _idle(server.url, "llama-long")  # nothing else of this model is counted meanwhile
    before = _metric(server.url, "slimserve_generated_tokens_total", labels)
    body = {"model": "llama-long", "prompt": PROMPT, "max_tokens": 4000, "temperature": 1.0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: "):
                received += 1
                if received == 2:
                    break
    _idle(server.url, "llama-long")
    generated = _metric(server.url, "slimserve_generated_tokens_total", labels) - before
    # 4000 tokens take about 30 s on this model; stopping within a second leaves a few hundred at most
    assert 2 <= generated < 600, generated
    assert _metric(server.url, "slimserve_requests_total",
                   'code="499",model="llama-long",protocol="openai",variant="original"') >= 1


def test_beyond_the_bound_requests_get_429_and_the_server_stays_flat(server: Server) -> None:
    import psutil

    process = psutil.Process(server.process.pid)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "llama-long", "prompt": PROMPT, "max_tokens": 150, "temperature": 0}
            return list(await asyncio.gather(*(client.post(f"{server.url}/v1/completions", json=body)
                                               for _ in range(MAX_GENERATIONS + 20))))

    first = asyncio.run(burst())
    rss_after_first = process.memory_info().rss
    second = asyncio.run(burst())
    rss_after_second = process.memory_info().rss
    for responses in (first, second):
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        assert MAX_GENERATIONS <= codes.count(200) < len(codes)
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1"
        assert "SLIMSERVE_MAX_GENERATIONS" in refused.json()["error"]
        texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
        assert len(texts) == 1  # greedy: every concurrent answer is the same
    assert rss_after_second - rss_after_first < 64 * 1024**2
    assert _complete(server.url, "llama-long", prompt=PROMPT, max_tokens=3).status_code == 200


def test_generation_metrics(server: Server) -> None:
    _complete(server.url, "qwen2", prompt=PROMPT, max_tokens=8, temperature=0)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("slimserve_time_to_first_token_seconds_count", "slimserve_time_per_output_token_seconds_count",
                 "slimserve_generated_tokens_total", "slimserve_prompt_tokens_total"):
        assert _metric(server.url, name, 'model="qwen2",variant="original"') >= 1, name
    assert 'slimserve_requests_total{code="200",model="qwen2",protocol="openai",variant="original"}' in text
    latency = httpx.get(f"{server.url}/models/qwen2/latency", params={"minutes": 5}, timeout=10).json()
    original = latency["variants"]["original"]
    assert original["generated_tokens"] >= 8 and original["decode_tokens_per_second"] > 0
    assert original["ttft_p50_ms"] > 0 and original["ttft_p99_ms"] >= original["ttft_p50_ms"]


def test_the_dashboard_shows_tokens_per_second_and_time_to_first_token(server: Server) -> None:
    from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt)")
    _complete(server.url, "qwen2", prompt=PROMPT, max_tokens=8, temperature=0)

    async def read_row() -> tuple[list[str], str, str]:
        from playwright.async_api import async_playwright, expect

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(server.url + "/")
                table = page.get_by_test_id("variants-qwen2")
                row = table.locator("tr[data-variant=original]")
                await expect(row.get_by_test_id("tokens-per-second")).not_to_have_text("–", timeout=15_000)
                headers = await table.locator("th").all_inner_texts()
                return (headers, await row.get_by_test_id("tokens-per-second").inner_text(),
                        await row.get_by_test_id("ttft").inner_text())
            finally:
                await browser.close()

    headers, rate, ttft = asyncio.run(read_row())
    assert {"TTFT p50 ms", "tokens/s", "tokens generated"} <= set(headers)
    assert float(rate) > 0 and float(ttft) > 0


def _copy(folders: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(folders / "llama", target)
    return target


def test_uploads_refused_with_the_reason(server: Server, folders: Path, tmp_path: Path) -> None:
    huge = _copy(folders, tmp_path, "huge-context")
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10_000_000}))

    broken = _copy(folders, tmp_path, "broken-template")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")

    refusing = _copy(folders, tmp_path, "refusing-template")
    (refusing / "chat_template.jinja").write_text("{{ raise_exception('this template takes no messages') }}")

    escaping = _copy(folders, tmp_path, "escaping-template")
    (escaping / "chat_template.jinja").write_text(
        "{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}")

    falcon = _copy(folders, tmp_path, "falcon")
    (falcon / "config.json").write_text(json.dumps({**config, "model_type": "falcon",
                                                    "architectures": ["FalconForCausalLM"]}))
    cases = {"huge-context": (huge, "10000000 tokens"), "broken-template": (broken, "does not compile"),
             "refusing-template": (refusing, "takes no messages"), "escaping-template": (escaping, "chat template"),
             "falcon": (falcon, "FalconForCausalLM")}
    for name, (folder, needle) in cases.items():
        response = _upload(server.url, name, folder)
        assert response.status_code == 422, (name, response.text)
        assert needle in response.json()["error"], (name, response.json())
        assert httpx.get(f"{server.url}/models/{name}").status_code == 404
    assert _complete(server.url, "llama", prompt=PROMPT, max_tokens=2).status_code == 200


def test_tensor_routes_point_to_generation_and_back(server: Server) -> None:
    from tests.helpers import MODELS as BUNDLED

    url = server.url
    metadata = httpx.get(f"{url}/v2/models/llama").json()
    assert metadata["platform"] == "onnxruntime_genai" and metadata["versions"] == ["original"]
    assert metadata["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    refused = httpx.post(f"{url}/v2/models/llama/infer", json=body)
    assert refused.status_code == 400 and "/v2/models/llama/generate" in refused.json()["error"]
    embeddings = httpx.post(f"{url}/v1/embeddings", json={"model": "llama", "input": "hi"})
    assert embeddings.status_code == 422 and "not a text embeddings model" in embeddings.json()["error"]
    with open(BUNDLED / "digits_mlp.onnx", "rb") as handle:
        assert httpx.post(f"{url}/models", data={"name": "digits"}, files={"file": ("m.onnx", handle)},
                          timeout=60).status_code == 201
    tensor_model = _complete(url, "digits", prompt=PROMPT)
    assert tensor_model.status_code == 422 and "does not generate text" in tensor_model.json()["error"]


def _stdlib_texts(count: int) -> bytes:
    """Python source from the standard library, as a .jsonl text dataset (one chunk of code per line)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[str] = []
    for path in sorted(root.glob("*.py"))[40:]:
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks.extend(text[i:i + 500] for i in range(0, min(len(text), 2000), 500))
        if len(chunks) >= count:
            break
    return "".join(json.dumps({"text": c}) + "\n" for c in chunks[:count]).encode()


@pytest.fixture(scope="module")
def compressed(server: Server) -> dict[str, Any]:
    """llama compressed by the int4-weight preset on a text dataset (the job's finished record)."""
    from tests.worker.helpers import wait_for_job

    dataset = httpx.post(f"{server.url}/models/llama/datasets", data={"name": "code"},
                         files={"file": ("code.jsonl", _stdlib_texts(24))}, timeout=60)
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["samples"] == 24
    response = httpx.post(f"{server.url}/models/llama/compressions", timeout=30, json={
        "recipe": "int4-weight", "dataset": "code", "budget": {"metric": "perplexity", "max_increase": 0.5}})
    assert response.status_code == 202, response.text
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job = wait_for_job(client, response.json()["id"], timeout=300)
    assert job["state"] == "succeeded", job["error"]
    return job


def test_int4_report_measures_perplexity_agreement_and_speed(server: Server, compressed: dict[str, Any]) -> None:
    report = compressed["report"]
    fidelity, speed = report["fidelity"], report["speed"]
    assert fidelity["original_perplexity"] > 1 and fidelity["perplexity"] > 1
    assert fidelity["perplexity_increase"] == pytest.approx(fidelity["perplexity"] / fidelity["original_perplexity"]
                                                            - 1, abs=1e-4)
    # random weights: INT4 changes many greedy choices (the trained LM of benchmarks/generation.py keeps them)
    assert 0 < fidelity["token_agreement"] <= 1 and fidelity["kl_divergence"] > 0
    assert fidelity["positions"] > 100 and "dataset 'code'" in fidelity["data"]
    assert speed["decode_tokens_per_second"] > 0 and speed["original_decode_tokens_per_second"] > 0
    assert speed["time_to_first_token_ms"] > 0 and speed["prompt_tokens"] == 128
    assert report["size_ratio"] < 0.6  # 4-bit blocks against float32
    notes = report["notes"]
    assert notes["quantization"]["algorithm"] == "rtn" and notes["quantization"]["matmuls"].get("float", 0) == 0
    table = notes["embeddings"]  # measured: the 4-bit table against the original's float one
    assert notes["quantization"]["embeddings"] == table["chosen"] in ("int4", "float")
    assert table["size_bytes"]["float"] > table["size_bytes"]["int4"] and set(table["perplexity"]) == {"int4", "float"}
    assert notes["lm_head"]["chosen"] in ("int4", "int8") and set(notes["lm_head"]["perplexity"]) == {"int4", "int8"}
    assert notes["edge_blocks"] == {"chosen": "int4", "measured": False, "reason": "fewer than three decoder blocks"}
    assert notes["accuracy_level"]["chosen"] in (1, 4) and set(notes["accuracy_level"]["decode_tokens_per_second"]) \
        == {"1", "4"}
    assert report["within_budget"] == (fidelity["perplexity_increase"] <= 0.5)
    model = httpx.get(f"{server.url}/models/llama").json()
    variant = next(v for v in model["variants"] if v["name"] == compressed["variant"])
    assert variant["size_bytes"] < next(v for v in model["variants"] if v["name"] == "original")["size_bytes"]


def test_variants_are_served_and_routed(server: Server, compressed: dict[str, Any]) -> None:
    url, variant = server.url, compressed["variant"]
    answer = _complete(url, f"llama:{variant}", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.status_code == 200 and answer.headers["X-Variant"] == variant
    generated = httpx.post(f"{url}/v2/models/llama/versions/{variant}/generate", timeout=60,
                           json={"text_input": PROMPT, "parameters": {"max_tokens": 8, "temperature": 0}}).json()
    assert generated["text_output"] == answer.json()["choices"][0]["text"]
    assert f"llama:{variant}" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    routing = {"default": "original", "canary": {"variant": variant, "percent": 50},
               "shadow": None}
    assert httpx.put(f"{url}/models/llama/routing", json=routing).status_code == 200
    served = {_complete(url, "llama", prompt=PROMPT, max_tokens=2).headers["X-Variant"] for _ in range(24)}
    assert served == {"original", variant}
    shadowed = {"default": "original", "canary": None, "shadow": {"variant": variant, "percent": 100}}
    assert httpx.put(f"{url}/models/llama/routing", json=shadowed).status_code == 200
    for _ in range(6):
        assert _complete(url, "llama", prompt=PROMPT, max_tokens=16, temperature=0).headers["X-Variant"] == "original"
    deadline = time.monotonic() + 15
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/models/llama").json()["shadow"].get(variant) or {}
        if stats.get("requests", 0) >= 6:
            break
        time.sleep(0.3)
    assert stats["requests"] >= 6 and stats["rows"] >= 6 * 16 and stats["metric"] == "agreement"
    assert 0 < stats["agreement"] <= 1.0
    assert _metric(url, "slimserve_shadow_agreement_ratio", f'model="llama",variant="{variant}"') > 0
    httpx.put(f"{url}/models/llama/routing", json={"default": "original", "canary": None, "shadow": None})


def test_generation_jobs_refused_with_the_reason(server: Server, compressed: dict[str, Any]) -> None:
    cases = [
        ({"recipe": "int8-dynamic", "dataset": "code"}, "one step"),
        ({"recipe": {"steps": [{"op": "prune", "mode": "unstructured", "sparsity": 0.5}]}, "dataset": "code"},
         "one step"),
        ({"recipe": "int4-weight", "dataset": "code", "budget": {"metric": "agreement", "max_drop": 0.01}},
         "perplexity"),
    ]
    for body, needle in cases:
        response = httpx.post(f"{server.url}/models/llama/compressions", json=body, timeout=30)
        assert response.status_code == 422 and needle in response.json()["error"], response.text
    no_data = httpx.post(f"{server.url}/models/qwen2/compressions", json={"recipe": "int4-weight"}, timeout=30)
    assert no_data.status_code == 422 and "upload a .txt or .jsonl dataset" in no_data.json()["error"]
    arrays = httpx.post(f"{server.url}/models/qwen2/datasets", files={"file": ("x.npz", b"PK\x03\x04rest")})
    assert arrays.status_code == 422 and "text datasets" in arrays.json()["error"]


def test_captured_chat_traffic_calibrates_and_measures_a_variant(server: Server) -> None:
    from tests.worker.helpers import wait_for_job

    url = server.url
    assert httpx.put(f"{url}/models/qwen2/capture", json={"samples": 16}, timeout=10).status_code == 200
    words = Path(__file__).read_text().split()
    for index in range(8):
        question = " ".join(words[index * 9:index * 9 + 6])
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "qwen2", "messages": [{"role": "user", "content": question}], "max_tokens": 12, "seed": index})
        assert response.status_code == 200, response.text
    deadline = time.monotonic() + 30
    model = httpx.get(f"{url}/models/qwen2", timeout=10).json()
    while time.monotonic() < deadline and (model["capture"] or {}).get("seen") != 8:
        time.sleep(0.2)
        model = httpx.get(f"{url}/models/qwen2", timeout=10).json()
    assert model["capture"] == {"samples": 16, "seen": 8}
    assert next(d for d in model["datasets"] if d["name"] == "traffic")["samples"] == 8
    job = httpx.post(f"{url}/models/qwen2/compressions", timeout=30, json={
        "recipe": {"steps": [{"op": "quantize", "mode": "int4", "lm_head": "int8", "accuracy_level": 4}]},
        "dataset": "traffic", "budget": {"metric": "perplexity", "max_increase": 10}}).json()
    with httpx.Client(base_url=url, timeout=30) as client:
        done = wait_for_job(client, job["id"], timeout=300)
    assert done["state"] == "succeeded", done["error"]
    fidelity = done["report"]["fidelity"]
    # the rendered conversations (ChatML markers and all), as the model saw them
    assert "dataset 'traffic'" in fidelity["data"] and fidelity["positions"] > 8 * 12
    assert httpx.delete(f"{url}/models/qwen2/capture", timeout=10).json()["enabled"] is False


def test_gguf_files_are_refused_with_what_to_do(server: Server) -> None:
    header = b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") * 2
    response = httpx.post(f"{server.url}/models", data={"name": "gguf"},
                          files={"file": ("model.Q4_0.gguf", header + b"\0" * 64)}, timeout=30)
    assert response.status_code == 415 and response.json()["code"] == "gguf_not_supported"
    assert "Hugging Face folder" in response.json()["error"]
    assert httpx.get(f"{server.url}/models/gguf").status_code == 404


def _grpc_prompt(text: str) -> Any:
    import tritonclient.grpc as triton

    prompt = triton.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return prompt


def test_tritonclient_grpc_generates_as_rest_does(server: Server) -> None:
    import queue

    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    rest = _complete(server.url, "qwen2", prompt=PROMPT, max_tokens=10, temperature=0).json()["choices"][0]["text"]
    client = triton.InferenceServerClient(server.grpc_target)
    try:
        metadata = client.get_model_metadata("qwen2")
        assert metadata.platform == "onnxruntime_genai" and [i.name for i in metadata.inputs] == ["text_input"]
        assert [(o.name, o.datatype) for o in metadata.outputs] == [("text_output", "BYTES")]
        result = client.infer("qwen2", [_grpc_prompt(PROMPT)], parameters={"max_tokens": 10, "temperature": 0})
        assert result.as_numpy("text_output")[0].decode() == rest
        parameters = result.get_response().parameters
        assert parameters["finish_reason"].string_param == "length"
        assert parameters["completion_tokens"].int64_param == 10 and parameters["prompt_tokens"].int64_param > 0
        # streaming, as Triton's decoupled LLM backends do: pieces, then an empty final response
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("qwen2", [_grpc_prompt(PROMPT)], request_id="s1",
                                  parameters={"max_tokens": 10, "temperature": 0, "stream": True})
        pieces: list[str] = []
        while True:
            answer, error = answers.get(timeout=60)
            assert error is None, error
            pieces.append(answer.as_numpy("text_output")[0].decode())
            final = answer.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        client.stop_stream()
        assert "".join(pieces) == rest and len(pieces) > 2 and answer.get_response().id == "s1"
        # vLLM backend's form: the settings as a JSON input
        settings = triton.InferInput("sampling_parameters", [1], "BYTES")
        settings.set_data_from_numpy(np.array([json.dumps({"max_tokens": 10, "temperature": 0}).encode()],
                                              dtype=object))
        assert client.infer("qwen2", [_grpc_prompt(PROMPT), settings]).as_numpy("text_output")[0].decode() == rest
        for inputs, parameters, needle in [
            ([_grpc_prompt(PROMPT)], {"max_tokens": 0}, "max_tokens"),
            ([_grpc_prompt(PROMPT)], {"temperature": -1.0}, "temperature"),
            ([_grpc_prompt(PROMPT)], {"max_tokens": 10 ** 9}, "context"),
            ([], {}, "text_input"),
        ]:
            with pytest.raises(InferenceServerException, match=needle) as refused:
                client.infer("qwen2", inputs, parameters=parameters)
            assert refused.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()
