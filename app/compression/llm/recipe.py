"""Compression of a generation model: one weight-only quantize step, measured against the original, or the
`auto` search over the INT4 algorithms for the fastest variant within the perplexity budget.

Choices a step leaves to `auto` are made by measurement on the dataset's text, and the notes show every figure:
the LM head, and the first and last decoder blocks, at INT8 or at the step's precision (each kept at INT8 when
that removes a third or more of the perplexity increase), the embedding table at 4 bits or in float (float only
when the 4-bit table leaves the variant over the budget), and MatMulNBits' accuracy level (int8 activations
kept when at least 5% faster, within 0.01 of level 1's token agreement and within the perplexity budget: on some
models level 4 picks wrong top tokens, microsoft/onnxruntime#29849).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from app.compression.config import Budget, QuantizeStep, Recipe
from app.compression.errors import Cancelled, CompressionError, InvalidRecipe, StepFailed
from app.compression.llm import evaluate
from app.compression.llm.embeddings import with_float_table
from app.compression.llm.forward import genai_config
from app.compression.llm.quantize import (
    QuantizedBody,
    edge_blocks,
    quantize_body,
    set_accuracy_level,
    write_variant,
)
from app.compression.progress import CancelToken

Progress = Callable[[float, str], None]
MAX_TOKENS_PER_TEXT = 256
MAX_EVAL_SEQUENCES = 64
AUTO_ALGORITHMS = ("rtn", "k_quant", "hqq", "gptq")
_INT8_GAIN = 1 / 3
_LEVEL_MIN_GAIN = 0.05
# Level 4's int8 activations cost a little agreement (measured 0.002-0.006 on the trained LM); microsoft/onnxruntime
# #29849 is about far worse: wrong top tokens across the board. Level 1 can be 20-40x slower (8-bit weights).
_LEVEL_AGREEMENT_SLACK = 0.01


@dataclass
class LlmResult:
    output: Path | None
    """The variant's genai folder."""
    report: dict[str, Any] | None
    candidates: list[dict[str, Any]] | None = None
    winner: str | None = None
    within_budget: bool = True


@dataclass
class _Texts:
    calibration: list[list[int]]
    evaluation: list[list[int]]
    source: str


@dataclass
class _Job:
    original: Path
    work: Path
    texts: _Texts
    budget: Budget
    threads: int
    progress: Progress
    cancel: CancelToken | None
    notes: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.cancel is not None:
            self.cancel.check()


def token_sequences(folder: Path, texts: list[str], source: str) -> _Texts:
    """The dataset's texts as token ids (the folder's own tokenizer), split: even texts calibrate, odd ones
    measure; a dataset of fewer than four texts serves both."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    encoded = [ids[:MAX_TOKENS_PER_TEXT] for ids in (list(e.ids) for e in tokenizer.encode_batch(texts))
               if len(ids) > 1]
    if not encoded:
        raise InvalidRecipe("the dataset's texts encode to fewer than two tokens each: nothing to measure on")
    if len(encoded) < 4:
        return _Texts(encoded, encoded[:MAX_EVAL_SEQUENCES], f"{source} (too few texts to split: all of them)")
    return _Texts(encoded[::2], encoded[1::2][:MAX_EVAL_SEQUENCES], f"{source} (odd texts; even ones calibrate)")


def the_step(recipe: Recipe) -> QuantizeStep:
    steps = recipe.steps
    if len(steps) != 1 or not isinstance(steps[0], QuantizeStep) or steps[0].mode not in ("int4", "int8"):
        raise InvalidRecipe("a generation model is compressed by one step, {\"op\": \"quantize\", \"mode\": "
                            "\"int4\" | \"int8\"} (weight-only); pruning, distillation and activation quantization "
                            "of decoder LLMs are not supported")
    return steps[0]


def run_llm_recipe(original: Path, output: Path, recipe: Recipe, texts: _Texts, *, budget: Budget | None,
                   progress: Progress, cancel: CancelToken | None, threads: int) -> LlmResult:
    """Quantize the original folder into `output` as the recipe's step says, and measure it."""
    step = the_step(recipe)
    job = _Job(original, output.parent / "candidates", texts, budget or Budget(metric="perplexity"), threads,
               progress, cancel)
    name, folder, notes = _build(job, step, 0.0, 0.8)
    report = _report(job, {name: folder}, notes={name: notes})[name]
    _move(folder, output)
    return LlmResult(output, report, winner=name, within_budget=report["within_budget"])


def search_llm(original: Path, output: Path, texts: _Texts, *, budget: Budget | None, progress: Progress,
               cancel: CancelToken | None, threads: int) -> LlmResult:
    """Every INT4 algorithm, measured on the same text and timed side by side; the fastest within budget wins
    (the most faithful when none is)."""
    job = _Job(original, output.parent / "candidates", texts, budget or Budget(metric="perplexity"), threads,
               progress, cancel)
    folders, notes, failures = {}, {}, []
    for index, algorithm in enumerate(AUTO_ALGORITHMS):
        step = QuantizeStep.model_validate({"mode": "int4", "algorithm": algorithm})
        share = 0.7 / len(AUTO_ALGORITHMS)
        try:
            name, folder, step_notes = _build(job, step, index * share, (index + 1) * share)
        except Cancelled:
            raise
        except CompressionError as exc:  # one algorithm that cannot run here does not end the search
            failures.append({"name": f"int4-{algorithm}", "error": str(exc), "report": None})
            continue
        folders[name], notes[name] = folder, step_notes
    reports = _report(job, folders, notes)
    candidates = [{"name": name, "recipe": {"steps": [{"op": "quantize", "mode": "int4", "algorithm": name[5:]}]},
                   "report": report, "error": None} for name, report in reports.items()] + failures
    within = [name for name, report in reports.items() if report["within_budget"]]
    if within:
        winner = max(within, key=lambda n: reports[n]["speed"]["decode_tokens_per_second"])
    else:
        winner = min(reports, key=lambda n: reports[n]["fidelity"]["perplexity"])
    _move(folders[winner], output)
    return LlmResult(output, {**reports[winner], "search": {"winner": winner, "within_budget": bool(within)}},
                     candidates=candidates, winner=winner, within_budget=bool(within))


def _build(job: _Job, step: QuantizeStep, start: float, end: float) -> tuple[str, Path, dict[str, Any]]:
    """The step's variant folder with its LM head and accuracy level chosen; (name, folder, notes)."""
    bits = 4 if step.mode == "int4" else 8
    algorithm = step.algorithm or "rtn"
    name = f"int{bits}-{algorithm}"
    job.progress(start, f"{name}: quantizing weights")
    _check(job)
    try:
        body = quantize_body(job.original, bits=bits, algorithm=algorithm, block_size=step.block_size,
                             calibration=job.texts.calibration, threads=job.threads,
                             embeddings=step.embeddings != "float", scratch=job.work, check=job.check)
    except CompressionError:
        raise
    except Exception as exc:  # onnxruntime's quantizer failing on this model: named, never an internal error
        raise StepFailed(f"{name}: onnxruntime's MatMulNBits quantizer failed: {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from exc
    _check(job)
    notes: dict[str, Any] = {}
    folder, notes["quantization"] = _head(job, body, step, name, bits, notes)
    if bits == 4 and step.edge_blocks != "quantize":
        job.progress(start + (end - start) * 0.5, f"{name}: first and last blocks at INT8")
        folder, notes["quantization"] = _edges(job, step, name, body, folder, notes)
    if step.embeddings == "auto" and notes["quantization"]["embeddings"] != "float":
        job.progress(start + (end - start) * 0.6, f"{name}: the embedding table in float")
        notes["embeddings"] = _embeddings(job, name, folder, notes["quantization"])
    job.progress(start + (end - start) * 0.7, f"{name}: choosing the accuracy level")
    # Measured for 8 bits too: 8-bit MatMulNBits at level 0/1 ran 10-17x slower than at level 4 here.
    notes["accuracy_level"] = _accuracy_level(job, folder, step, name)
    return name, folder, notes


def _head(job: _Job, body: QuantizedBody, step: QuantizeStep, name: str, bits: int,
          notes: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    fixed = {"quantize": bits, "int8": 8, "float": None}
    if step.lm_head != "auto" or bits == 8:
        head_bits = bits if bits == 8 else fixed[step.lm_head]
        folder = job.work / name
        return folder, write_variant(body, job.original, folder, head_bits=head_bits)
    low, high = job.work / f"{name}.head{bits}", job.work / f"{name}.head8"
    low_notes = write_variant(body, job.original, low, head_bits=bits)
    high_notes = write_variant(body, job.original, high, head_bits=8)
    keep_high, notes["lm_head"] = _higher_precision_pays(job, low, high, bits)
    shutil.rmtree(low if keep_high else high, ignore_errors=True)
    return (high, high_notes) if keep_high else (low, low_notes)


def _edges(job: _Job, step: QuantizeStep, name: str, quantized: QuantizedBody, folder: Path,
           notes: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The first and last decoder blocks at INT8 where the step says so, or where auto measures it pays."""
    quantization: dict[str, Any] = notes["quantization"]
    graph = onnx.load(str(job.original / genai_config(job.original)["model"]["decoder"]["filename"]),
                      load_external_data=False)
    if not edge_blocks(graph):
        notes["edge_blocks"] = {"chosen": quantization["edge_blocks"], "measured": False,
                                "reason": "fewer than three decoder blocks"}
        return folder, quantization
    body = quantize_body(job.original, bits=4, algorithm=quantization["algorithm"], block_size=step.block_size,
                         calibration=job.texts.calibration, threads=job.threads,
                         embeddings=step.embeddings != "float", edge_bits=8, scratch=job.work,
                         hessians=quantized.hessians, check=job.check)
    head_bits = {"float": None, "int8": 8, "int4": 4}[quantization["lm_head"]]
    high = job.work / f"{name}.edges8"
    high_notes = write_variant(body, job.original, high, head_bits=head_bits)
    if step.edge_blocks == "int8":
        notes["edge_blocks"] = {"chosen": "int8", "measured": False}
        shutil.rmtree(folder)
        os.replace(high, folder)
        return folder, high_notes
    keep_high, notes["edge_blocks"] = _higher_precision_pays(job, folder, high, 4)
    if keep_high:
        shutil.rmtree(folder)
        os.replace(high, folder)
        return folder, high_notes
    shutil.rmtree(high)
    return folder, quantization


def _embeddings(job: _Job, name: str, folder: Path, quantization: dict[str, Any]) -> dict[str, Any]:
    """The embedding table back in float where the 4-bit one leaves the variant over the perplexity budget and
    float lowers its perplexity (in place). The table costs size, not decode speed (one row per token), and in
    float it is large (113 MB of a 135M model's 117 MB INT4 variant would be 16 MB at 4 bits): so it is kept in
    float only when fidelity needs it, not whenever it helps."""
    high = job.work / f"{name}.float-table"
    if not with_float_table(folder, job.original, high):
        return {"chosen": quantization["embeddings"], "measured": False, "reason": "no quantized table"}
    _, figures = _higher_precision_pays(job, folder, high, 4, higher="float")
    low, float_ppl, base = figures["perplexity"]["int4"], figures["perplexity"]["float"], figures["original_perplexity"]
    keep_float = low / base - 1 > job.budget.max_increase and float_ppl < low
    figures["chosen"] = "float" if keep_float else "int4"
    figures["size_bytes"] = {"int4": _size(folder), "float": _size(high)}
    if keep_float:
        shutil.rmtree(folder)
        os.replace(high, folder)
        quantization["embeddings"] = "float"
    else:
        shutil.rmtree(high)
    return figures


def _higher_precision_pays(job: _Job, low: Path, high: Path, bits: int, *,
                           higher: str = "int8") -> tuple[bool, dict[str, Any]]:
    """Whether the variant with a part at higher precision (`high`) removes a third or more of the perplexity
    increase of the one with it at `bits`, on the evaluation text; and the figures."""
    scores = evaluate.score(job.original, {"low": low, "high": high}, job.texts.evaluation, threads=job.threads)
    low_ppl, high_ppl = scores.report("low")["perplexity"], scores.report("high")["perplexity"]
    base = scores.report("low")["original_perplexity"]
    keep_high = (low_ppl - high_ppl) >= _INT8_GAIN * max(low_ppl - base, 0.0) and high_ppl < low_ppl
    return keep_high, {"chosen": higher if keep_high else f"int{bits}",
                       "perplexity": {f"int{bits}": low_ppl, higher: high_ppl}, "original_perplexity": base}


def _accuracy_level(job: _Job, folder: Path, step: QuantizeStep, name: str) -> dict[str, Any]:
    if step.accuracy_level != "auto":
        set_accuracy_level(folder, int(step.accuracy_level))
        return {"chosen": step.accuracy_level, "measured": False}
    exact = folder.parent / f"{name}.level1"
    _link_copy(folder, exact)
    set_accuracy_level(exact, 1)
    set_accuracy_level(folder, 4)
    prompt = job.texts.evaluation[0]
    timings = evaluate.speed({"1": exact, "4": folder}, prompt, threads=job.threads)
    scores = evaluate.score(job.original, {"1": exact, "4": folder}, job.texts.evaluation[:8], threads=job.threads)
    rate = {level: timings[level]["decode_tokens_per_second"] for level in ("1", "4")}
    agreement = {level: scores.report(level)["token_agreement"] for level in ("1", "4")}
    increase = scores.report("4")["perplexity"] / scores.report("4")["original_perplexity"] - 1
    keep_int8 = rate["4"] >= rate["1"] * (1 + _LEVEL_MIN_GAIN) and \
        agreement["4"] >= agreement["1"] - _LEVEL_AGREEMENT_SLACK and increase <= job.budget.max_increase
    if not keep_int8:
        shutil.rmtree(folder)
        os.replace(exact, folder)
    else:
        shutil.rmtree(exact)
    return {"chosen": 4 if keep_int8 else 1, "decode_tokens_per_second": rate, "token_agreement": agreement,
            "level_4_perplexity_increase": round(increase, 6), "measured_on": "8 held-out texts"}


def _report(job: _Job, folders: dict[str, Path], notes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    job.progress(0.8, "measuring perplexity, agreement and KL divergence")
    _check(job)
    scores = evaluate.score(job.original, folders, job.texts.evaluation, threads=job.threads)
    job.progress(0.9, "timing generation")
    _check(job)
    timings = evaluate.speed({"original": job.original, **folders}, job.texts.evaluation[0], threads=job.threads)
    original_size = _size(job.original)
    reports = {}
    for name, folder in folders.items():
        fidelity = {**scores.report(name), "data": job.texts.source}
        increase = fidelity["perplexity"] / fidelity["original_perplexity"] - 1
        fidelity["perplexity_increase"] = round(increase, 6)
        size = _size(folder)
        speed = {"decode_tokens_per_second": timings[name]["decode_tokens_per_second"],
                 "original_decode_tokens_per_second": timings["original"]["decode_tokens_per_second"],
                 "time_to_first_token_ms": timings[name]["time_to_first_token_ms"],
                 "original_time_to_first_token_ms": timings["original"]["time_to_first_token_ms"],
                 "prompt_tokens": evaluate.PROMPT_TOKENS, "decode_tokens": evaluate.DECODE_TOKENS}
        decode_speedup = round(speed["decode_tokens_per_second"] / max(speed["original_decode_tokens_per_second"],
                                                                       1e-9), 3)
        # The Report's shape for every model; what applies to tensor models only is null here.
        reports[name] = {
            "size_bytes": size, "size_ratio": round(size / original_size, 4), "gzip_bytes": None,
            "parameters": None, "nonzero_parameters": None, "latency_ms": None,
            "speedup": {"batch_1": decode_speedup, "batch_n": None, "decode": decode_speedup},
            "speed": speed, "fidelity": {"samples": len(job.texts.evaluation), "agreement": None, "accuracy": None,
                                         "original_accuracy": None, "cosine_mean": None, **fidelity},
            "notes": notes.get(name, {}), "threads": job.threads,
            "budget": job.budget.model_dump(),
            "within_budget": bool(increase <= job.budget.max_increase + 1e-9),
            "original": {"size_bytes": original_size},
        }
    return reports


def _size(folder: Path) -> int:
    decoder = genai_config(folder)["model"]["decoder"]["filename"]
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(decoder))


def _link_copy(source: Path, target: Path) -> None:
    """A copy whose weights file is a hard link: only the graph is rewritten there."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.endswith(".data"):
            os.link(path, target / path.name)
        else:
            shutil.copy2(path, target / path.name)


def _move(folder: Path, output: Path) -> None:
    shutil.rmtree(output, ignore_errors=True)
    os.replace(folder, output)
    shutil.rmtree(folder.parent, ignore_errors=True)


def _check(job: _Job) -> None:
    job.check()
