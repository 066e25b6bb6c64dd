"""Weight-only compression of a real onnxruntime-genai folder (the builder's fp32 export of a small Llama): the
`auto` search over the INT4 algorithms, and what the quantizer refuses."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from app.compression.config import Budget, parse_recipe
from app.compression.errors import InvalidRecipe
from app.compression.llm.forward import DecoderSession
from app.compression.llm.quantize import quantize_body
from app.compression.llm.recipe import run_llm_recipe, search_llm, token_sequences
from app.formats.genai_build import run_builder
from tests.exports import llm_folders


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("genai") / "fp32"
    run_builder(llm_folders() / "qwen2", folder, precision="fp32", label="qwen2")
    return folder


def _texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace")[:400] for p in sorted(root.glob("*.py"))[60:76]]


def test_auto_builds_every_algorithm_and_keeps_the_fastest_within_budget(fp32: Path, tmp_path: Path) -> None:
    texts = token_sequences(fp32, _texts(), "stdlib")
    stages: list[str] = []
    result = search_llm(fp32, tmp_path / "out" / "variant", texts, budget=Budget(metric="perplexity",
                                                                                   max_increase=10.0),
                        progress=lambda _f, stage: stages.append(stage), cancel=None, threads=1)
    assert result.output is not None and (result.output / "genai_config.json").is_file()
    names = {c["name"] for c in result.candidates or []}
    assert names == {"int4-rtn", "int4-k_quant", "int4-hqq", "int4-gptq"}
    reports = {c["name"]: c["report"] for c in result.candidates or []}
    within = [n for n, r in reports.items() if r["within_budget"]]
    assert result.within_budget and result.winner in within
    assert result.winner == max(within, key=lambda n: reports[n]["speed"]["decode_tokens_per_second"])
    for report in reports.values():
        assert report["fidelity"]["original_perplexity"] == reports["int4-rtn"]["fidelity"]["original_perplexity"]
        table = report["notes"]["quantization"]["embeddings"]
        assert report["notes"]["embeddings"]["chosen"] == table and report["size_ratio"] < (0.6 if table == "int4"
                                                                                              else 1.0)
    assert any("gptq" in stage for stage in stages)
    DecoderSession(result.output).logits([5, 6, 7])  # the kept folder loads and runs
    assert not (tmp_path / "out" / "candidates").exists()  # the others were removed


def test_fixed_choices_are_used_as_given(fp32: Path, tmp_path: Path) -> None:
    texts = token_sequences(fp32, _texts(), "stdlib")
    recipe = parse_recipe({"steps": [{"op": "quantize", "mode": "int8", "accuracy_level": 4}]})
    result = run_llm_recipe(fp32, tmp_path / "v", recipe, texts, budget=None, progress=lambda _f, _s: None,
                            cancel=None, threads=1)
    assert result.report is not None
    notes = result.report["notes"]
    assert notes["accuracy_level"] == {"chosen": 4, "measured": False}
    assert notes["quantization"]["matmuls"] == {"int8": sum(notes["quantization"]["matmuls"].values())}
    assert notes["quantization"]["embeddings"] == "float"  # onnxruntime has no 8-bit table gather
    assert result.report["fidelity"]["token_agreement"] > 0.9
    assert json.loads((tmp_path / "v" / "genai_config.json").read_text())["model"]["type"] == "qwen2"


@pytest.mark.parametrize(("settings", "needle"), [
    ({"bits": 4, "algorithm": "gptq", "calibration": None}, "gptq calibrates on text"),
    ({"bits": 8, "algorithm": "hqq", "calibration": None}, "int8 uses rtn"),
    ({"bits": 4, "algorithm": "awq", "calibration": None}, "unknown algorithm"),
])
def test_the_quantizer_refuses_what_it_cannot_do(fp32: Path, settings: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRecipe, match=needle):
        quantize_body(fp32, block_size=32, **settings)  # type: ignore[arg-type]


def test_a_recipe_of_other_steps_is_refused(fp32: Path, tmp_path: Path) -> None:
    texts = token_sequences(fp32, _texts(), "stdlib")
    with pytest.raises(InvalidRecipe, match="one step"):
        run_llm_recipe(fp32, tmp_path / "v", parse_recipe("int8-dynamic"), texts, budget=None,
                       progress=lambda _f, _s: None, cancel=None, threads=1)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder's fp32 export of an 8-block Llama: first and last blocks are a quarter of its body."""
    folder = tmp_path_factory.mktemp("genai-deep") / "fp32"
    run_builder(llm_folders() / "llama-long", folder, precision="fp32", label="llama-long")
    return folder


def test_edge_blocks_at_int8_as_given_and_by_measurement(deep: Path, tmp_path: Path) -> None:
    texts = token_sequences(deep, _texts(), "stdlib")
    fixed = {"op": "quantize", "mode": "int4", "lm_head": "quantize", "accuracy_level": 4}
    given = run_llm_recipe(deep, tmp_path / "given" / "v",
                           parse_recipe({"steps": [{**fixed, "edge_blocks": "int8", "embeddings": "quantize"}]}),
                           texts, budget=None, progress=lambda _f, _s: None, cancel=None, threads=1)
    assert given.report is not None
    quantization = given.report["notes"]["quantization"]
    assert quantization["matmuls"] == {"int8": 2 * 5, "int4": 6 * 5 + 1} and quantization["edge_blocks"] == "int8"
    measured = run_llm_recipe(deep, tmp_path / "auto" / "v", parse_recipe({"steps": [fixed]}), texts, budget=None,
                              progress=lambda _f, _s: None, cancel=None, threads=1)
    assert measured.report is not None
    edges = measured.report["notes"]["edge_blocks"]
    low, high, base = edges["perplexity"]["int4"], edges["perplexity"]["int8"], edges["original_perplexity"]
    assert edges["chosen"] == ("int8" if high < low and low - high >= (low - base) / 3 else "int4")
    assert measured.report["notes"]["quantization"]["edge_blocks"] == edges["chosen"]
    table = measured.report["notes"]["embeddings"]
    low, high, base = table["perplexity"]["int4"], table["perplexity"]["float"], table["original_perplexity"]
    # no budget given: the default, +5% perplexity
    assert table["chosen"] == ("float" if low / base - 1 > 0.05 and high < low else "int4")
    assert table["size_bytes"]["float"] > table["size_bytes"]["int4"]
    assert measured.report["notes"]["quantization"]["embeddings"] == table["chosen"]
    assert measured.output is not None
    DecoderSession(measured.output).logits([5, 6, 7])


def test_gptq_is_closer_to_the_original_than_round_to_nearest(deep: Path, tmp_path: Path) -> None:
    from app.compression.llm import evaluate
    from app.compression.llm.quantize import write_variant

    texts = token_sequences(deep, _texts(), "stdlib")
    folders = {}
    for algorithm in ("rtn", "gptq"):
        body = quantize_body(deep, bits=4, algorithm=algorithm, block_size=32, calibration=texts.calibration)
        folders[algorithm] = tmp_path / algorithm
        notes = write_variant(body, deep, folders[algorithm], head_bits=4)
        assert notes["matmuls"] == {"int4": 41} and notes["embeddings"] == "int4"
    scores = evaluate.score(deep, folders, texts.evaluation, threads=1)
    # held-out texts (calibration used the others): GPTQ's layer-wise error compensation keeps the output closer
    assert scores.report("gptq")["kl_divergence"] < scores.report("rtn")["kl_divergence"]
