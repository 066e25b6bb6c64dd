"""Hugging Face folders through the real server: every supported architecture converted by a job, answering texts
as transformers does, compressed once each on a text dataset; OpenAI's own client; what must be refused."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.e2e.folders import settled as _settled
from tests.e2e.folders import upload_folder as _upload
from tests.exports import hf_folders
from tests.helpers import REPO
from tests.processes import Server
from tests.worker.helpers import wait_for_job

pytestmark = pytest.mark.e2e

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Models are compressed and served.",
         "A longer sentence, with punctuation: commas, colons; and a question?"]
ARCHITECTURES = {"bert": "BertModel", "bert-vocab-only": "BertModel", "roberta": "RobertaModel",
                 "xlm-roberta": "XLMRobertaModel", "distilbert": "DistilBertModel", "mpnet": "MPNetModel",
                 "electra": "ElectraModel", "deberta-v2": "DebertaV2Model", "albert": "AlbertModel",
                 "bert-classifier": "BertForSequenceClassification", "bert-ner": "BertForTokenClassification",
                 "sentence-bert": "BertModel", "vit-classifier": "ViTForImageClassification"}
# One compression each: INT8 (with the transformer fusions) where the architectures differ most, FP16 elsewhere.
PRESET = {"bert": "int8-dynamic", "roberta": "int8-dynamic", "deberta-v2": "int8-dynamic", "bert-ner": "int8-static",
          "sentence-bert": "int8-dynamic", "bert-classifier": "int8-static"}
TASKS = {"bert-classifier": "classification", "bert-ner": "token-classification", "vit-classifier": "classification"}


def _v2_text(url: str, name: str, texts: list[str], variant: str | None = None) -> dict[str, Any]:
    path = f"/v2/models/{name}" + (f"/versions/{variant}" if variant else "") + "/infer"
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]} | {"_parameters": response.json().get("parameters")}


@pytest.fixture(scope="module")
def folders() -> Path:
    return hf_folders()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, folders: Path) -> Iterator[Server]:
    """A server with every architecture uploaded (converting in the background while the tests start)."""
    from tests.processes import start_server

    # two jobs at once: a conversion is mostly importing torch and transformers into a fresh job process
    started = start_server(tmp_path_factory.mktemp("hf") / "data", SLIMSERVE_EMBEDDED_WORKERS="2",
                           SLIMSERVE_CAPTURE_FLUSH_SECONDS="0.5")
    for name in ARCHITECTURES:
        assert _upload(started.url, name, folders / name).status_code == 201, name
    yield started
    started.stop(signal.SIGKILL)


def _expected(folders: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(folders / f"{name}.expected.npz") as archive:
        return {k: archive[k] for k in archive.files}


def test_every_architecture_converts_and_answers_like_transformers(server: Server, folders: Path) -> None:
    for name, architecture in ARCHITECTURES.items():
        model = _settled(server.url, name)
        assert model["state"] == "ready", (name, model["error"])
        assert model["format"] == "huggingface" and model["architecture"] == architecture
        assert model["task"] == TASKS.get(name, "embeddings")
        assert model["conversion"]["max_abs_error"] < 1e-3 and model["conversion"]["cosine_min"] > 0.9999
        expected = _expected(folders, name)
        if name == "vit-classifier":
            assert model["tokenizer"] is False and model["image"]["size"] == 32
            assert [i["name"] for i in model["inputs"]] == ["pixel_values"]
            logits = httpx.post(f"{server.url}/models/{name}/predict", timeout=30,
                                json={"inputs": {"pixel_values": expected["pixels"].tolist()}}).json()
            np.testing.assert_allclose(np.asarray(logits["outputs"]["logits"]), expected["output"], atol=1e-4)
            continue
        assert model["tokenizer"] is True and model["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        answer = _v2_text(server.url, name, TEXTS)
        if model["task"] == "embeddings":
            assert answer["embeddings"]["shape"] == [4, 32]
            np.testing.assert_allclose(np.reshape(answer["embeddings"]["data"], (4, 32)), expected["output"],
                                       atol=1e-4)
        elif model["task"] == "classification":
            logits = expected["output"]
            scores = np.exp(logits - logits.max(1, keepdims=True))
            scores /= scores.sum(1, keepdims=True)
            np.testing.assert_allclose(np.reshape(answer["scores"]["data"], (4, 3)), scores, atol=1e-4)
            names = {0: "negative", 1: "neutral", 2: "positive"}
            assert answer["label"]["data"] == [names[int(i)] for i in logits.argmax(1)]
        else:
            entities = [json.loads(e) for e in answer["entities"]["data"]]
            assert len(entities) == 4 and all(isinstance(e, list) for e in entities)
            for text, found in zip(TEXTS, entities, strict=True):
                for entity in found:
                    assert entity["entity"] in ("B-PER", "I-PER") and text[entity["start"]:entity["end"]] == \
                        entity["word"]


def test_one_compression_each_on_a_text_dataset(server: Server, folders: Path) -> None:
    texts = "\n".join(line.strip() for line in Path("/usr/share/common-licenses/GPL-3").read_text().splitlines()
                      if len(line.split()) > 4)[:20_000] if Path("/usr/share/common-licenses/GPL-3").is_file() \
        else "\n".join(TEXTS * 20)
    jobs = {}
    for name in ARCHITECTURES:
        if name == "vit-classifier":
            continue
        _settled(server.url, name)
        dataset = httpx.post(f"{server.url}/models/{name}/datasets", data={"name": "docs"},
                             files={"file": ("docs.txt", texts.encode())}, timeout=60)
        assert dataset.status_code == 201, (name, dataset.text)
        assert dataset.json()["samples"] > 50
        response = httpx.post(f"{server.url}/models/{name}/compressions", timeout=30,
                              json={"recipe": PRESET.get(name, "fp16"), "dataset": "docs",
                                    "budget": {"metric": "cosine", "max_drop": 0.05}})
        assert response.status_code == 202, (name, response.text)
        jobs[name] = response.json()["id"]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name, job_id in jobs.items():
            done = wait_for_job(client, job_id, timeout=240)
            assert done["state"] == "succeeded", (name, done["error"])
            assert done["report"]["fidelity"]["data"] == "dataset"
            served = _v2_text(server.url, name, TEXTS[:2], variant=done["variant"])
            assert set(served) - {"_parameters"} == set(_v2_text(server.url, name, TEXTS[:2])) - {"_parameters"}


def test_openai_client_embeddings_and_models(server: Server) -> None:
    import openai

    _settled(server.url, "sentence-bert")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="sentence-bert", input=TEXTS)  # the client asks for base64 itself
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (4, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    floats = client.embeddings.create(model="sentence-bert", input="Hello world.", encoding_format="float")
    np.testing.assert_allclose(floats.data[0].embedding, vectors[0], atol=1e-6)
    assert result.usage.prompt_tokens == result.usage.total_tokens > 4 and result.model == "sentence-bert"
    pinned = client.embeddings.create(model="sentence-bert:original", input=TEXTS[:1])
    np.testing.assert_allclose(pinned.data[0].embedding, vectors[0], atol=1e-6)
    assert "sentence-bert" in {m.id for m in client.models.list()}
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="sentence-bert", input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nothing-here", input="x")
    # Served by onnxruntime and tokenizers alone: PyTorch (and transformers with it) stays in the job processes.
    libraries = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "libonnxruntime" in libraries and "libtorch" not in libraries


def _binary_text(texts: list[bytes]) -> tuple[bytes, int]:
    raw = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return header + raw, len(header)


def test_texts_in_every_encoding_and_the_bad_ones(server: Server) -> None:
    url = server.url
    _settled(url, "bert")
    plain = httpx.post(f"{url}/models/bert/predict", json={"inputs": {"text": TEXTS[:2]}}, timeout=30).json()
    binary, length = _binary_text([t.encode() for t in TEXTS[:2]])
    v2 = httpx.post(f"{url}/v2/models/bert/infer", content=binary, timeout=30,
                    headers={"Inference-Header-Content-Length": str(length)})
    assert v2.status_code == 200, v2.text
    np.testing.assert_allclose(np.reshape(v2.json()["outputs"][0]["data"], (2, 32)), plain["outputs"]["embeddings"],
                               atol=1e-6)
    metadata = httpx.get(f"{url}/v2/models/bert", timeout=10).json()
    assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]

    empty = httpx.post(f"{url}/models/bert/predict", json={"inputs": {"text": []}}, timeout=30)
    assert empty.status_code == 400 and "empty" in empty.json()["error"]
    invalid, length = _binary_text([b"fine", b"\xff\xfe not utf-8"])
    refused = httpx.post(f"{url}/v2/models/bert/infer", content=invalid, timeout=30,
                         headers={"Inference-Header-Content-Length": str(length)})
    assert refused.status_code == 400 and "text 1 is not valid UTF-8" in refused.json()["error"]
    long = httpx.post(f"{url}/models/bert/predict", json={"inputs": {"text": ["word " * 20_000]}}, timeout=60)
    assert long.status_code == 200 and "truncated" in long.json()["warnings"][0]
    warned = _v2_text(url, "bert", ["word " * 20_000])
    assert "truncated" in warned["_parameters"]["warnings"][0]
    assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200


def test_texts_over_grpc_answer_as_over_rest(server: Server) -> None:
    import tritonclient.grpc as triton

    _settled(server.url, "bert")
    plain = httpx.post(f"{server.url}/models/bert/predict", json={"inputs": {"text": TEXTS[:2]}}, timeout=30).json()
    with triton.InferenceServerClient(server.grpc_target) as client:
        text = triton.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:2]], dtype=object))
        answer = client.infer("bert", [text])
        np.testing.assert_allclose(answer.as_numpy("embeddings"), plain["outputs"]["embeddings"], atol=1e-6)
        long = triton.InferInput("text", [1], "BYTES")
        long.set_data_from_numpy(np.array([b"word " * 20_000], dtype=object))
        warned = client.infer("bert", [long]).get_response()
        assert "truncated" in warned.parameters["warnings"].string_param
        bad = triton.InferInput("text", [1], "BYTES")
        bad.set_data_from_numpy(np.array([b"\xff\xfe not utf-8"], dtype=object))
        with pytest.raises(Exception, match="INVALID_ARGUMENT.*text 0 is not valid UTF-8"):
            client.infer("bert", [bad])


def test_the_command_line_sends_texts(server: Server) -> None:
    _settled(server.url, "bert")
    command = [sys.executable, "-m", "app", "predict", "bert", "--text", TEXTS[0], "--text", TEXTS[1], "--url",
               server.url]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    plain = httpx.post(f"{server.url}/models/bert/predict", json={"inputs": {"text": TEXTS[:2]}}, timeout=30).json()
    np.testing.assert_allclose(json.loads(done.stdout)["outputs"]["embeddings"], plain["outputs"]["embeddings"],
                               atol=1e-6)
    neither = subprocess.run(command[:5] + command[-2:], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert neither.returncode == 2 and "either --input FILE or --text" in neither.stdout + neither.stderr
    both = subprocess.run([*command, "--input", __file__], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "either --input FILE or --text" in both.stdout + both.stderr


@pytest.mark.parametrize(("folder", "status", "message"), [
    ("refused-remote-code", 422, "auto_map"),
    ("refused-architecture", 422, "model type 'gpt2'"),
    ("refused-no-tokenizer", 422, "has no tokenizer"),
    ("refused-pickle", 415, "posix.system"),
])
def test_folders_that_would_run_code_or_cannot_be_served_are_refused(
    server: Server, folders: Path, folder: str, status: int, message: str,
) -> None:
    response = _upload(server.url, folder.replace("refused-", "x-"), folders / folder)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert not (folders / "remote-code-ran").exists() and not (folders / "pickle-ran").exists()
    assert httpx.get(f"{server.url}/models/{folder.replace('refused-', 'x-')}", timeout=10).status_code == 404


def test_a_tokenizer_that_does_not_match_the_vocabulary_fails_the_conversion(server: Server, folders: Path) -> None:
    assert _upload(server.url, "mismatch", folders / "refused-tokenizer-too-large").status_code == 201
    model = _settled(server.url, "mismatch")
    assert model["state"] == "failed" and "do not belong together" in model["error"]


def test_a_conversion_killed_with_its_server_resumes_after_the_restart(
    server_factory: Callable[..., Server], folders: Path, tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    first = server_factory(data)
    assert _upload(first.url, "bert", folders / "bert").status_code == 201
    with first.client() as client:
        job = client.get("/jobs", params={"model": "bert"}).json()["jobs"][0]
        wait_for_job(client, job["id"], timeout=60, states=("running", "succeeded"))
    first.stop(signal.SIGKILL)
    second = server_factory(data)
    model = _settled(second.url, "bert", timeout=240)
    assert model["state"] == "ready", model
    answer = _v2_text(second.url, "bert", TEXTS[:1])
    assert answer["embeddings"]["shape"] == [1, 32]


def test_embeddings_in_base64_match_floats(server: Server) -> None:
    _settled(server.url, "bert")
    body = {"model": "bert", "input": TEXTS[:2]}
    floats = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30).json()
    packed = httpx.post(f"{server.url}/v1/embeddings", json={**body, "encoding_format": "base64"}, timeout=30).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][1]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][1]["embedding"], atol=1e-7)
    wrong = httpx.post(f"{server.url}/v1/embeddings", json={"model": "bert-classifier", "input": "x"}, timeout=30)
    assert wrong.status_code == 422 and "not a text embeddings model" in wrong.json()["error"]


def test_the_dashboard_shows_the_task_and_answers_a_sentence(server: Server) -> None:
    from tests.e2e.test_dashboard import CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt)")
    for name in ("bert", "bert-classifier", "bert-ner"):
        _settled(server.url, name)
    asyncio.run(_ask_in_the_dashboard(server.url))


async def _ask_in_the_dashboard(url: str) -> None:
    from playwright.async_api import async_playwright, expect

    from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(url + "/")
            card = page.locator("div.model[data-model=bert-classifier]")
            await expect(card.locator("h3")).to_contain_text("classification (BertForSequenceClassification)")
            expected = httpx.post(f"{url}/models/bert-classifier/predict", json={"inputs": {"text": TEXTS[1:2]}},
                                  timeout=30).json()["outputs"]["label"][0]
            for name, text, shown in (("bert-classifier", TEXTS[1], expected), ("bert", TEXTS[0], "embedding of 32"),
                                      ("bert-ner", "Ada Lovelace met Charles Babbage.", "")):
                form = page.get_by_test_id(f"text-{name}")
                await form.locator("input[name=text]").fill(text)
                await form.get_by_role("button", name="Send").click()
                await expect(page.get_by_test_id(f"answer-{name}")).to_contain_text(f"original: {shown}")
            await page.wait_for_timeout(1500)  # a refresh or two later the answers are still there
            await expect(page.get_by_test_id("answer-bert")).to_contain_text("embedding of 32")
            assert errors == []
        finally:
            await browser.close()


def test_deleting_a_model_keeps_what_another_model_shares(server: Server, folders: Path) -> None:
    _settled(server.url, "bert")
    assert _upload(server.url, "bert-copy", folders / "bert").status_code == 201
    assert _settled(server.url, "bert-copy")["state"] == "ready"
    artifacts = server.data_dir / "artifacts"
    tokenizers = sorted(artifacts.rglob("*.tok"))
    assert httpx.delete(f"{server.url}/models/bert-copy", timeout=30).status_code == 204
    # the same folder, the same tokenizer: both still belong to 'bert'
    assert sorted(artifacts.rglob("*.tok")) == tokenizers
    bert = httpx.get(f"{server.url}/models/bert", timeout=10).json()
    assert (artifacts / bert["sha256"][:2] / f"{bert['sha256']}.hfd" / "MANIFEST.json").is_file()
    assert _v2_text(server.url, "bert", TEXTS[:1])["embeddings"]["shape"] == [1, 32]


def test_captured_texts_feed_the_automatic_search(server: Server) -> None:
    url = server.url
    _settled(url, "sentence-bert")
    assert httpx.put(f"{url}/models/sentence-bert/capture", json={"samples": 64}, timeout=10).status_code == 200
    words = Path(__file__).read_text().split()
    sent = [" ".join(words[i:i + 3 + i % 17]) for i in range(0, 1200, 12)]  # 100 texts of 3 to 19 words
    for start in range(0, len(sent), 5):
        response = httpx.post(f"{url}/v1/embeddings", json={"model": "sentence-bert", "input": sent[start:start + 5]},
                              timeout=30)
        assert response.status_code == 200
    deadline = time.monotonic() + 30
    model = httpx.get(f"{url}/models/sentence-bert", timeout=10).json()
    while time.monotonic() < deadline and (model["capture"] or {}).get("seen") != len(sent):
        time.sleep(0.2)
        model = httpx.get(f"{url}/models/sentence-bert", timeout=10).json()
    assert model["capture"] == {"samples": 64, "seen": len(sent)}
    traffic = next(d for d in model["datasets"] if d["name"] == "traffic")
    assert traffic["samples"] == 64
    job = httpx.post(f"{url}/models/sentence-bert/compressions", timeout=30, json={
        "recipe": "auto", "dataset": "traffic", "budget": {"metric": "cosine", "max_drop": 0.02}}).json()
    with httpx.Client(base_url=url, timeout=30) as client:
        done = wait_for_job(client, job["id"], timeout=400)
    assert done["state"] == "succeeded", done["error"]
    assert done["report"]["fidelity"]["data"] == "dataset" and done["report"]["within_budget"]
    assert len([c for c in done["candidates"] if c["report"]]) >= 3
    assert httpx.delete(f"{url}/models/sentence-bert/capture", timeout=10).json()["enabled"] is False
