"""Decoder LLMs: INT4 algorithms against the fp32 original (perplexity, agreement, KL, decode speed, time to
first token), tokens/s through the real server at concurrency 1, 4 and 8, and llama.cpp beside us if it is there.

Usage (by hand, not a test; about 20 minutes on 2 cores):
    .venv/bin/python models/train_llm.py --out var/llm-trained          # once, 18 minutes
    .venv/bin/python benchmarks/generation.py --write docs/generation.md [--section NAME ...]
        [--llama-cpp /path/to/venv/bin/python]

Two models, one run, the same threads everywhere (2):
- the LM `models/train_llm.py` trained on the standard library's sources (3.4M parameters): fidelity on its
  held-out files (`var/llm-trained.heldout.jsonl`), GPTQ calibrated on `var/llm-trained.calibration.jsonl`;
- a random-weight Llama shaped like SmolLM-135M (30 layers, hidden 576, 49152-token vocabulary, tied
  embeddings; 135M parameters), for speed only: random weights make perplexity meaningless.

Every variant is built and measured by the functions the worker runs (`app/compression/llm`); the server rows
upload the trained LM, compress it by a job and time `/v1/completions` with concurrent clients.
"""

# ruff: noqa: T201
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))

from app.compression.llm import evaluate  # noqa: E402
from app.compression.llm.embeddings import with_float_table  # noqa: E402
from app.compression.llm.quantize import quantize_body, set_accuracy_level, write_variant  # noqa: E402
from app.compression.llm.recipe import token_sequences  # noqa: E402
from app.formats.genai_build import run_builder  # noqa: E402
from benchmarks.docs_section import write_section  # noqa: E402

THREADS = 2
ALGORITHMS = ("rtn", "k_quant", "hqq", "gptq", "gptq_inc")
EDGES = ("rtn", "gptq")  # also built with the first and last blocks at INT8
SECTIONS = ("fidelity", "speed", "server", "llama-cpp")


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _random_135m(out: Path) -> Path:
    """A SmolLM-135M-shaped Llama with seeded random weights and the trained LM's tokenizer."""
    import torch
    import transformers
    from build_llms import llm_config

    if (out / "config.json").is_file():
        return out
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "var" / "llm-trained")
    config = llm_config("llama", 49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536,
                        context=2048)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _build_variants(source: Path, work: Path, calibration: list[list[int]] | None,
                    algorithms: tuple[str, ...], *, edges: bool = False) -> dict[str, Path]:
    """fp32 by the builder; then each INT4 algorithm with the LM head at INT4 and at INT8, and INT8 (RTN), each at
    MatMulNBits accuracy levels 1 (float32 compute) and 4 (int8 activations); embeddings at the body's bits."""
    fp32 = work / "fp32"
    if not (fp32 / "genai_config.json").is_file():
        shutil.rmtree(fp32, ignore_errors=True)
        run_builder(source, fp32, precision="fp32", label=source.name)
    folders = {"fp32": fp32}
    bodies = [(f"int4-{a}", 4, a, None) for a in algorithms] + \
        [(f"int4-{a}-edges8", 4, a, 8) for a in EDGES if a in algorithms and edges] + \
        ([("int8-rtn", 8, "rtn", None)] if algorithms else [])
    for prefix, bits, algorithm, edge_bits in bodies:
        body = quantize_body(fp32, bits=bits, algorithm=algorithm, block_size=32, calibration=calibration,
                             threads=THREADS, edge_bits=edge_bits)
        for head in ((4, 8) if bits == 4 else (8,)):
            for level in (1, 4):
                name = f"{prefix}-head{head}-L{level}" if bits == 4 else f"{prefix}-L{level}"
                folder = work / name
                shutil.rmtree(folder, ignore_errors=True)
                write_variant(body, fp32, folder, head_bits=head)
                set_accuracy_level(folder, level)
                folders[name] = folder
    return folders


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def fidelity_section(work: Path) -> str:
    trained = REPO / "var" / "llm-trained"
    heldout = _texts(REPO / "var" / "llm-trained.heldout.jsonl")
    calibration_texts = _texts(REPO / "var" / "llm-trained.calibration.jsonl")
    folders = _build_variants(trained, work / "trained", None, ())
    split = token_sequences(folders["fp32"], heldout, "held-out")
    evaluation = (split.calibration + split.evaluation)[:64]
    split = token_sequences(folders["fp32"], calibration_texts, "calibration")
    calibration = split.calibration + split.evaluation
    folders = _build_variants(trained, work / "trained", calibration, ALGORITHMS, edges=True)
    for name in ("int4-rtn-head8-L4", "int4-gptq-head8-L4"):  # what the 4-bit embedding table costs
        target = work / "trained" / f"{name}-float-table"
        shutil.rmtree(target, ignore_errors=True)
        if with_float_table(folders[name], folders["fp32"], target):
            folders[target.name] = target
    candidates = {name: folder for name, folder in folders.items() if name != "fp32"}
    scores = evaluate.score(folders["fp32"], candidates, evaluation, threads=THREADS)
    timings = evaluate.speed(folders, evaluation[0], threads=THREADS)
    training = json.loads((trained / "training.json").read_text())
    lines = [
        f"Trained LM (`models/train_llm.py`: {training['parameters'] / 1e6:.1f}M parameters, {training['steps']} "
        f"steps, held-out perplexity {training['heldout_perplexity']:.2f} in torch), {len(evaluation)} held-out "
        f"sequences of up to 256 tokens ({scores.original.positions} positions), block size 32, {THREADS} "
        "threads. `gptq` is SlimServe's (`app/compression/llm/gptq.py`, the LM head too), `gptq_inc` onnxruntime's "
        "(Intel Neural Compressor's), both calibrated on 32 training sequences of 256 tokens. `edges8`: the first "
        "and last decoder blocks at INT8; `float-table`: the embedding table kept in float (else 4-bit). "
        "Decode speed: 64 tokens after a 128-token prompt, median of 3, all "
        "variants timed in alternation. `headN`: the LM head at N bits; `L1`/`L4`: MatMulNBits accuracy level 1 "
        "(float32 compute) or 4 (int8 activations).", "",
        "| variant | size × | perplexity | increase | token agreement | KL | decode tok/s | speed × | TTFT ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = timings["fp32"]["decode_tokens_per_second"]
    original_ppl = scores.report(next(iter(candidates)))["original_perplexity"]
    lines.append(f"| fp32 (original) | 1.000 | {original_ppl:.3f} | – | 1.0000 | 0 | {base:.0f} | 1.00 | "
                 f"{timings['fp32']['time_to_first_token_ms']:.1f} |")
    for name in candidates:
        report = scores.report(name)
        increase = report["perplexity"] / report["original_perplexity"] - 1
        rate = timings[name]["decode_tokens_per_second"]
        lines.append(f"| {name} | {_size(folders[name]) / _size(folders['fp32']):.3f} | {report['perplexity']:.3f} "
                     f"| {increase * 100:+.2f}% | {report['token_agreement']:.4f} | {report['kl_divergence']:.4f} "
                     f"| {rate:.0f} | {rate / base:.2f} | {timings[name]['time_to_first_token_ms']:.1f} |")
    return "\n".join(lines)


def speed_section(work: Path) -> str:
    source = _random_135m(work / "random-135m-hf")
    calibration_texts = _texts(REPO / "var" / "llm-trained.calibration.jsonl")  # the same tokenizer
    split = token_sequences(REPO / "var" / "llm-trained", calibration_texts, "calibration")
    folders = _build_variants(source, work / "random-135m", split.calibration + split.evaluation,
                              ("rtn", "k_quant", "gptq"))
    prompt = list(range(5, 5 + evaluate.PROMPT_TOKENS))
    chosen = folders
    timings = evaluate.speed(chosen, prompt, threads=THREADS)
    base = timings["fp32"]["decode_tokens_per_second"]
    lines = [f"Random-weight SmolLM-135M shape (135M parameters), {THREADS} threads, batch 1, 64 tokens after a "
             "128-token prompt, median of 3, timed in alternation.", "",
             "| variant | size MB | decode tok/s | speed × | TTFT ms (128-token prompt) |", "|---|---:|---:|---:|---:|"]
    for name, folder in chosen.items():
        rate = timings[name]["decode_tokens_per_second"]
        lines.append(f"| {name} | {_size(folder) / 1e6:.0f} | {rate:.1f} | {rate / base:.2f} | "
                     f"{timings[name]['time_to_first_token_ms']:.0f} |")
    return "\n".join(lines)


async def _concurrent(url: str, model: str, clients: int, tokens: int) -> tuple[float, float]:
    import httpx

    body = {"model": model, "prompt": "def main(args):\n    ", "max_tokens": tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        answers = await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(clients)))
        wall = time.perf_counter() - started
    generated = sum(a.json()["usage"]["completion_tokens"] for a in answers if a.status_code == 200)
    return generated / wall, wall


def server_section(work: Path) -> str:
    import httpx

    from tests.e2e.folders import settled, upload_folder
    from tests.processes import start_server
    from tests.worker.helpers import wait_for_job

    source = _random_135m(work / "random-135m-hf")
    server = start_server(work / "server-data", SLIMSERVE_MAX_GENERATIONS="8", SLIMSERVE_MAX_CONTEXT_TOKENS="4096",
                          SLIMSERVE_GENERATION_THREADS=str(THREADS))
    try:
        assert upload_folder(server.url, "smol", source).status_code == 201
        assert settled(server.url, "smol", timeout=1800)["state"] == "ready"
        dataset = (REPO / "var" / "llm-trained.calibration.jsonl").read_bytes()
        httpx.post(f"{server.url}/models/smol/datasets", data={"name": "text"},
                   files={"file": ("text.jsonl", dataset)}, timeout=120)
        job = httpx.post(f"{server.url}/models/smol/compressions", timeout=60, json={
            "recipe": {"steps": [{"op": "quantize", "mode": "int4", "algorithm": "rtn", "accuracy_level": 4,
                                  "lm_head": "int8"}]}, "dataset": "text", "variant": "int4"}).json()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            done = wait_for_job(client, job["id"], timeout=3600)
        assert done["state"] == "succeeded", done["error"]
        lines = [f"The 135M model through `/v1/completions` (greedy, 64 tokens each, {THREADS} onnxruntime threads "
                 "shared by the generations, one generator per request).", "",
                 "| variant | clients | tokens/s (all clients) | wall s |", "|---|---:|---:|---:|"]
        for variant in ("original", "int4"):
            model = "smol" if variant == "original" else "smol:int4"
            asyncio.run(_concurrent(server.url, model, 1, 8))  # load the model
            for clients in (1, 4, 8):
                rate, wall = asyncio.run(_concurrent(server.url, model, clients, 64))
                lines.append(f"| {variant} | {clients} | {rate:.1f} | {wall:.1f} |")
        return "\n".join(lines)
    finally:
        server.stop()


# llama.cpp's converter, with our tokenizer taken as GPT-2's: it is byte-level BPE with GPT-2's pre-tokenizer,
# but the converter knows tokenizers by the hash of their output on a test text, and ours is new to it (and it
# tries sentencepiece first, which this environment does not have).
_CONVERT = """
import sys
source, folder, out = sys.argv[1:4]
sys.path[:0] = [source, source + "/gguf-py"]
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", "f32"]
import convert_hf_to_gguf
from conversion import base
def no_sentencepiece(self, add_to_gguf=True):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_sentencepiece
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
convert_hf_to_gguf.main()
"""


def llama_cpp_section(work: Path, python: str | None, source: Path | None) -> str:
    """Decode speed beside llama.cpp on the same weights: its F32 GGUF and Q4_0 against our fp32 and INT4."""
    if python is None or source is None:
        return ("llama.cpp was not measured in this run: pass `--llama-cpp <python of a venv with llama-cpp-python>` "
                "and `--llama-cpp-src <llama.cpp source folder with convert_hf_to_gguf.py>`.")
    side = REPO / "benchmarks" / "llama_cpp_side.py"
    lines = [f"Same weights, {THREADS} threads, batch 1, greedy, 64 tokens after a 128-token prompt, median of 3. "
             "llama.cpp: its converter (`convert_hf_to_gguf.py --outtype f32`) and quantizer (`Q4_0`, whose default "
             "mix keeps the output tensor at higher precision); SlimServe: INT4 RTN, block 32, LM head INT8, "
             "accuracy level 4 (the closest mix). Each side in its own process, one after the other.", "",
             "| model | SlimServe fp32 tok/s | llama.cpp F32 tok/s | SlimServe INT4 tok/s | llama.cpp Q4_0 tok/s | "
             "INT4 ÷ Q4_0 | TTFT ms INT4 / Q4_0 | size MB INT4 / Q4_0 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    models = {"trained LM (3.4M)": (REPO / "var" / "llm-trained", work / "trained"),
              "SmolLM-135M shape": (_random_135m(work / "random-135m-hf"), work / "random-135m")}
    version = "?"
    for label, (hf_folder, built) in models.items():
        folders = _build_variants(hf_folder, built, None, ("rtn",)) \
            if not (built / "int4-rtn-head8-L4").is_dir() else {"fp32": built / "fp32",
                                                                 "int4-rtn-head8-L4": built / "int4-rtn-head8-L4"}
        gguf = work / f"{hf_folder.name}.f32.gguf"
        if not gguf.is_file():
            subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(hf_folder), str(gguf)], check=True,
                           capture_output=True, timeout=1800)
        done = subprocess.run([python, str(side), str(gguf), str(THREADS)], capture_output=True, text=True,
                              check=False, timeout=3600)
        if done.returncode != 0:
            lines.append(f"| {label} | llama.cpp failed: {done.stderr.strip()[-300:]} |")
            continue
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        version = theirs["llama_cpp_python"]
        ours = evaluate.speed({"fp32": folders["fp32"], "int4": folders["int4-rtn-head8-L4"]},
                              list(range(5, 5 + evaluate.PROMPT_TOKENS)), threads=THREADS)
        int4, q4 = ours["int4"]["decode_tokens_per_second"], theirs["q4_0"]["decode_tokens_per_second"]
        lines.append(f"| {label} | {ours['fp32']['decode_tokens_per_second']:.0f} | "
                     f"{theirs['f32']['decode_tokens_per_second']:.0f} | {int4:.0f} | {q4:.0f} | {int4 / q4:.2f} | "
                     f"{ours['int4']['time_to_first_token_ms']:.0f} / {theirs['q4_0']['time_to_first_token_ms']:.0f} | "
                     f"{_size(folders['int4-rtn-head8-L4']) / 1e6:.1f} / {theirs['q4_0']['size_bytes'] / 1e6:.1f} |")
    lines.append(f"\n(llama-cpp-python {version})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path)
    parser.add_argument("--section", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "slimserve-generation-bench")
    parser.add_argument("--llama-cpp", help="python of a virtualenv with llama-cpp-python")
    parser.add_argument("--llama-cpp-src", type=Path,
                        help="llama.cpp's source folder (convert_hf_to_gguf.py, gguf-py), e.g. llama-cpp-python's "
                             "sdist's vendor/llama.cpp")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime-genai " \
              f"{_version('onnxruntime-genai')}, onnxruntime {_version('onnxruntime')}"
    for section in args.section:
        started = time.perf_counter()
        text = {"fidelity": lambda: fidelity_section(args.work), "speed": lambda: speed_section(args.work),
                "server": lambda: server_section(args.work),
                "llama-cpp": lambda: llama_cpp_section(args.work, args.llama_cpp, args.llama_cpp_src)}[section]()
        text += f"\n\n({machine}; {time.perf_counter() - started:.0f} s)"
        print(f"## {section}\n{text}\n", flush=True)
        if args.write:
            write_section(args.write, f"generation-{section}", text)
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
