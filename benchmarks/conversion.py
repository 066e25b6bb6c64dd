"""PyTorch upload benchmark: convert the example CNN and transformer from torch.export (.pt2) and TorchScript (.pt)
with the server's converter, then compare the ONNX model served by onnxruntime with PyTorch itself (what
TorchServe would run): conversion time, max abs error, latency at batch 1 and 32, one thread each.

Usage (run by hand, not a test; about a minute on 2 cores):
    .venv/bin/python benchmarks/conversion.py --write docs/performance.md
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.formats.torch_archive import sniff  # noqa: E402
from app.formats.torch_convert import convert  # noqa: E402
from app.formats.torch_inputs import parse_input_shapes  # noqa: E402
from tests import torch_files  # noqa: E402

START, END = "<!-- conversion:start -->", "<!-- conversion:end -->"
REPEATS = 200


def _inputs(kind: str, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind == "cnn":
        return {"x": rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)}
    ids = rng.integers(1, 1000, (rows, 32)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _p50(run: Any) -> float:
    for _ in range(10):
        run()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def _torch_module(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".pt":
            return torch.jit.load(str(path))
        return torch.export.load(str(path)).module()  # our own file: torch's loader is fine here


def measure(name: str, path: Path, kind: str, folder: Path) -> dict[str, Any]:
    archive = sniff(path, path.name, name)
    assert archive is not None
    shapes = parse_input_shapes(torch_files.CNN_INPUT if kind == "cnn" else torch_files.TRANSFORMER_INPUT)
    output = folder / f"{path.stem}-{archive.kind}.onnx"
    start = time.perf_counter()
    result = convert(path, archive.kind, output, label=name, samples=None, input_shapes=shapes,
                     progress=lambda _f, _s: None)
    seconds = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    module = _torch_module(path)
    rng = np.random.default_rng(0)
    row: dict[str, Any] = {"name": name, "format": archive.kind, "seconds": seconds,
                           "error": result.max_abs_error, "axes": result.dynamic_axes,
                           "source_kb": path.stat().st_size / 1024, "onnx_kb": output.stat().st_size / 1024}
    for rows in (1, 32):
        feeds = _inputs(kind, rows, rng)
        tensors = [torch.from_numpy(v) for v in feeds.values()]
        with torch.no_grad():
            expected = module(*tensors).numpy()
            row[f"torch_{rows}"] = _p50(lambda tensors=tensors: module(*tensors))
        got = session.run(None, feeds)[0]
        row[f"check_{rows}"] = float(np.max(np.abs(got - expected)))
        row[f"onnx_{rows}"] = _p50(lambda feeds=feeds: session.run(None, feeds))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| upload | format | conversion s | max abs error (conversion check / fresh inputs) | dynamic axes | "
        "file kB → ONNX kB | PyTorch b1 ms | ONNX b1 ms | PyTorch b32 ms | ONNX b32 ms | ONNX speedup b1 / b32 |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        axes = "; ".join(f"{k} {v}" for k, v in r["axes"].items())
        lines.append(
            f"| {r['name']} | {r['format']} | {r['seconds']:.1f} | {r['error']:.1e} / "
            f"{max(r['check_1'], r['check_32']):.1e} | {axes} | {r['source_kb']:.0f} → {r['onnx_kb']:.0f} | "
            f"{r['torch_1']:.3f} | {r['onnx_1']:.3f} | {r['torch_32']:.3f} | {r['onnx_32']:.3f} | "
            f"{r['torch_1'] / r['onnx_1']:.2f}× / {r['torch_32'] / r['onnx_32']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", type=Path, help="replace the conversion section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = torch_files.build(folder)
        rows = [measure("digits CNN", files["cnn.pt2"], "cnn", folder),
                measure("digits CNN", files["cnn.pt"], "cnn", folder),
                measure("transformer encoder", files["transformer.pt2"], "transformer", folder),
                measure("transformer encoder", files["transformer.pt"], "transformer", folder)]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = "\n".join([
        START,
        f"## PyTorch uploads: conversion and serving speed ({stamp})",
        "",
        f"`benchmarks/conversion.py` on {platform.machine()} ({platform.processor() or 'cpu'}), torch "
        f"{torch.__version__}, onnxruntime {ort.__version__}, one thread each. The converter is the server's own "
        "(`app/formats/torch_convert.py`, in-process, so without the job process start). Latency is the median of "
        f"{REPEATS} calls of PyTorch eager on the uploaded file (TorchScript module, or the `.pt2` program's "
        "module) against onnxruntime on the converted model; transformer rows use 32 tokens per row, a length "
        "the export never saw. The second error column compares both on fresh random inputs at batch 1 and 32.",
        "",
        table(rows),
        END,
    ])
    print(section)
    if args.write:
        text = args.write.read_text() if args.write.exists() else ""
        if START in text:
            text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _m: section, text, flags=re.S)
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        args.write.write_text(text)


if __name__ == "__main__":
    main()
