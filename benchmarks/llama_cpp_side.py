"""llama.cpp's side of benchmarks/generation.py, run by the python of a virtualenv with llama-cpp-python:

    <venv>/bin/python benchmarks/llama_cpp_side.py MODEL.f32.gguf THREADS

Quantizes the F32 GGUF to Q4_0 with llama.cpp's own quantizer (`llama_model_quantize`, its default mix: the
output tensor at a higher precision, as llama-quantize does), then times greedy decoding of 64 tokens after a
128-token prompt with THREADS threads, median of 3 after a warm-up, for both files. Prints one JSON object.
"""

# ruff: noqa: T201
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 128
DECODE_TOKENS = 64


def _quantize(source: Path, target: Path, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed on {source}")


def _time(path: Path, threads: int) -> dict[str, float]:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                  verbose=False)
    prompt = [(5 + i) % model.n_vocab() for i in range(PROMPT_TOKENS)]
    runs: list[tuple[float, float]] = []
    for index in range(4):
        model.reset()
        started = time.perf_counter()
        first, produced = 0.0, 0
        for _token in model.generate(prompt, temp=0.0, top_k=1, reset=True):
            produced += 1
            if produced == 1:
                first = time.perf_counter()
            if produced == DECODE_TOKENS:
                break
        done = time.perf_counter()
        if index:
            runs.append((first - started, (produced - 1) / (done - first)))
    return {"time_to_first_token_ms": round(statistics.median(r[0] for r in runs) * 1e3, 3),
            "decode_tokens_per_second": round(statistics.median(r[1] for r in runs), 2)}


def main() -> int:
    source, threads = Path(sys.argv[1]), int(sys.argv[2])
    quantized = source.with_name(source.name.replace(".f32.gguf", ".q4_0.gguf"))
    if not quantized.is_file():
        _quantize(source, quantized, threads)
    import llama_cpp

    result: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__,
                              "f32": {**_time(source, threads), "size_bytes": source.stat().st_size},
                              "q4_0": {**_time(quantized, threads), "size_bytes": quantized.stat().st_size}}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
