"""Train a small Llama on the Python standard library's sources, for fidelity figures that mean something.

Usage:
    .venv/bin/python models/train_llm.py --out var/llm-trained [--minutes 15] [--threads 2]

Random weights hide what quantization does to a language model: their next-token distributions are nearly flat,
so perplexity barely moves. This script trains a 3.4M-parameter LlamaForCausalLM (4 layers, hidden 256,
grouped-query attention, a 2048-token byte-level BPE vocabulary trained here) on the standard library's `.py`
files, which every machine with this Python has. Files are split by name hash: about 95% train, 5% held out.

Written to `--out`: the Hugging Face folder (`save_pretrained`: config, safetensors, tokenizer, ChatML
template) and `training.json` (steps, losses, held-out perplexity); beside it `<out>.heldout.jsonl` (held-out
text, for perplexity) and `<out>.calibration.jsonl` (training text, for GPTQ calibration), as datasets are
uploaded. Nothing is downloaded.
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_llms import CHATML, corpus_files, llm_config, train_tokenizer  # noqa: E402

SEQUENCE = 128
CHUNK_CHARACTERS = 600


def _split(files: list[Path]) -> tuple[list[Path], list[Path]]:
    heldout = [f for f in files if hashlib.sha256(f.name.encode()).digest()[0] < 13]  # about 5%
    return [f for f in files if f not in heldout], heldout


def _chunks(files: list[Path]) -> list[str]:
    """Texts of about CHUNK_CHARACTERS, cut at line ends, one per line once newlines are escaped."""
    out = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        start = 0
        while start < len(text):
            end = text.find("\n", start + CHUNK_CHARACTERS)
            end = len(text) if end < 0 else end
            piece = text[start:end].strip()
            if len(piece) > 100:
                out.append(piece)
            start = end + 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("var/llm-trained"))
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    train_files, heldout_files = _split(corpus_files())
    tokenizer = train_tokenizer(2048, train_files)
    tokenizer.chat_template = CHATML
    stream = np.concatenate([np.asarray(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id], dtype=np.int64)
                             for t in _chunks(train_files)])
    heldout = _chunks(heldout_files)
    print(f"{len(train_files)} training files ({len(stream)} tokens), {len(heldout_files)} held out "
          f"({len(heldout)} chunks)")
    config = llm_config("llama", len(tokenizer), hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512,
                        context=1024)
    model = transformers.LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    deadline = time.monotonic() + args.minutes * 60
    rng = np.random.default_rng(0)
    losses, step, warmup = [], 0, 100
    model.train()
    while time.monotonic() < deadline:
        starts = rng.integers(0, len(stream) - SEQUENCE - 1, args.batch)
        batch = torch.from_numpy(np.stack([stream[s:s + SEQUENCE + 1] for s in starts]))
        # Learning rate: linear warm-up, then cosine decay over the time budget.
        elapsed = 1 - (deadline - time.monotonic()) / (args.minutes * 60)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * scale
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
        step += 1
        if step % 50 == 0:
            print(f"step {step}: loss {np.mean(losses[-100:]):.3f}", flush=True)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in heldout[:200]:
            ids = torch.tensor([tokenizer(text)["input_ids"][:SEQUENCE]])
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    perplexity = math.exp(total / count)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    # Beside the folder, not in it: the folder is what gets uploaded, these are its datasets.
    for name, texts in (("heldout", heldout), ("calibration", _chunks(train_files)[::97][:256])):
        (args.out.parent / f"{args.out.name}.{name}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in texts))
    report = {"parameters": parameters, "steps": step, "batch": args.batch, "sequence": SEQUENCE,
              "minutes": args.minutes, "final_loss": float(np.mean(losses[-100:])), "heldout_perplexity": perplexity,
              "train_tokens": int(len(stream)), "heldout_chunks": len(heldout)}
    (args.out / "training.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
