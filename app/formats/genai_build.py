"""A vetted causal-LM folder -> an onnxruntime-genai folder, by onnxruntime-genai's model builder, checked
against transformers: runs in the worker, offline, never remote code.

The builder runs in a child process: it imports torch and transformers, prints freely, and holds the
whole model in memory while it writes; its exit frees all of that. The fp32 build is the model's `original`
variant (the reference every compressed variant is measured against); INT4 and INT8 builds are compression
recipes (`app/compression/llm`).

The check scores the same texts with transformers and with the ONNX decoder (teacher-forced logits), compares
transformers' tokenizer with the `tokenizers` one the server runs, and runs greedy decoding in both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import InvalidContent
from app.formats.huggingface import HuggingFaceFolder

Progress = Callable[[float, str], None]
TOLERANCE = 1e-3
GREEDY_TOKENS = 16
CHECK_TEXTS = [
    "Hello world.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "SlimServe compresses models and serves them over standard protocols.",
    "Une phrase en français, avec des accents : é, è, à, ç.",
]
BUILDER_TIMEOUT_SECONDS = 6 * 3600


def child_environment() -> dict[str, str]:
    """Offline, no telemetry, no remote code: the environment every builder child runs in."""
    return {**os.environ, "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_builder(source: Path, output: Path, *, precision: str, label: str,
                extra_options: dict[str, str] | None = None) -> None:
    """onnxruntime-genai's model builder, CPU target, into the empty folder `output`."""
    cache = output.parent / f"{output.name}.builder-cache"
    options = {"hf_token": "false", "hf_remote": "false", **(extra_options or {})}
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(output),
               "-p", precision, "-e", "cpu", "-c", str(cache),
               "--extra_options", *(f"{key}={value}" for key, value in options.items())]
    try:
        done = subprocess.run(command, env=child_environment(), capture_output=True, text=True,
                              timeout=BUILDER_TIMEOUT_SECONDS, check=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        reason = lines[-1][:400] if lines else f"exit status {done.returncode}"
        raise InvalidContent(f"{label}: onnxruntime-genai's model builder could not convert the model: {reason}")
    if not (output / "genai_config.json").is_file():
        raise InvalidContent(f"{label}: the model builder wrote no genai_config.json")


@dataclass
class GenerationCheck:
    max_abs_error: float
    tokenizer_match: bool
    greedy_match: bool
    greedy_tokens: int
    texts_checked: int

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_error": self.max_abs_error, "tokenizer_match": self.tokenizer_match,
                "greedy_match": self.greedy_match, "greedy_tokens": self.greedy_tokens,
                "rows_checked": self.texts_checked, "tolerance": TOLERANCE,
                "exporter": "onnxruntime-genai model builder, fp32, CPU",
                "checked_against": "transformers on the same texts (logits and greedy decoding)"}


def convert(source: Path, summary: HuggingFaceFolder, output: Path, *, label: str,
            progress: Progress) -> GenerationCheck:
    """Build the fp32 genai folder into `output` and check it; 422 when it does not match transformers."""
    progress(0.05, "converting with onnxruntime-genai's model builder")
    run_builder(source, output, precision="fp32", label=label)
    progress(0.7, "checking the ONNX model against transformers")
    return check(source, summary, output, label=label)


def check(source: Path, summary: HuggingFaceFolder, output: Path, *, label: str) -> GenerationCheck:
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ORT_DISABLE_TELEMETRY="1")
    import torch
    import transformers

    from app.compression.llm.forward import DecoderSession

    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model_class = getattr(transformers, summary.architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class.from_pretrained(source, local_files_only=True, trust_remote_code=False,
                                            torch_dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True,
                                                               trust_remote_code=False)
    decoder = DecoderSession(output)
    served = _GenaiTokenizer(output)
    error, scale, tokenizer_match, greedy_match = 0.0, 1.0, True, True
    for text in CHECK_TEXTS:
        ids = list(tokenizer(text)["input_ids"])
        tokenizer_match &= served.encode(text) == ids
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].float().numpy()
        got = decoder.logits(ids)
        error = max(error, float(np.max(np.abs(got - reference))))
        scale = max(scale, float(np.max(np.abs(reference))))
    prompt = list(tokenizer(CHECK_TEXTS[1])["input_ids"])
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=GREEDY_TOKENS, do_sample=False)[0, len(prompt):].tolist()
    greedy_match = served.greedy(prompt, GREEDY_TOKENS) == expected
    if error > TOLERANCE * scale:
        known = " (onnxruntime-genai's builder mis-exports models whose vocabulary is as large as their hidden " \
                "size)" if model.config.vocab_size == model.config.hidden_size else ""
        raise InvalidContent(f"{label}: the ONNX model's logits differ from transformers' by {error:.3g} "
                             f"(largest logit {scale:.3g}){known}; not published", code="conversion_mismatch")
    return GenerationCheck(error, tokenizer_match, greedy_match, len(expected), len(CHECK_TEXTS))


class _GenaiTokenizer:
    """The tokenizer and greedy loop the server will run, from the built folder."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime_genai as og
        from tokenizers import Tokenizer

        if not (folder / "tokenizer.json").is_file():
            raise InvalidContent("the converted folder has no tokenizer.json: the model's tokenizer has no fast "
                                 "(tokenizers) form", code="no_tokenizer")
        self._og = og
        self._model = og.Model(str(folder))
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def greedy(self, prompt: list[int], tokens: int) -> list[int]:
        params = self._og.GeneratorParams(self._model)
        params.set_search_options(max_length=len(prompt) + tokens, do_sample=False)
        generator = self._og.Generator(self._model, params)
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        produced = []
        while not generator.is_done():
            generator.generate_next_token()
            produced.append(int(generator.get_next_tokens()[0]))
        return produced


def describe(folder: Path) -> tuple[int | None, int, dict[str, Any]]:
    """(opset, parameters, generation settings) of a built genai folder, read from its graph and config."""
    import onnx

    from app.compression.llm.forward import genai_config

    config = genai_config(folder)
    proto = onnx.load(str(folder / config["model"]["decoder"]["filename"]), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    parameters = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    model = config["model"]
    eos = model.get("eos_token_id")
    settings = {"context_length": int(model["context_length"]), "vocab_size": int(model["vocab_size"]),
                "eos_token_ids": [int(t) for t in (eos if isinstance(eos, list) else [eos])]}
    return opset, parameters, settings
