"""Build small decoder LLM folders as users bring them: `save_pretrained` output with a BPE tokenizer.

Usage:
    .venv/bin/python models/build_llms.py --out var/llms [--only llama qwen2 ...]

Each folder is what transformers writes: `config.json`, `model.safetensors`, `generation_config.json`,
`tokenizer.json` / `tokenizer_config.json` (a byte-level BPE tokenizer trained here with `tokenizers` on the
Python standard library's sources, which every machine with Python has), and for some a `chat_template.jinja`.
Weights are seeded random: these folders test conversion and serving, not fidelity (the trained LM of
`models/train_llm.py` is for that). Nothing is downloaded.

- `llama`: LlamaForCausalLM with grouped-query attention and no chat template (chat requests to it are refused);
- `qwen2`: Qwen2ForCausalLM (biased QKV, tied embeddings) with a ChatML chat template;
- `llama-long`: a larger Llama (15M parameters) with a 4096-token context, slow enough that a test can see a
  generation stop when its client goes away, and that concurrent requests overlap;
- `llama-square`: a Llama whose vocabulary is as large as its hidden size. onnxruntime-genai 0.18's builder
  exports such a model wrongly (its logits differ from transformers' by more than their own size), so the
  conversion check must refuse it.
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_files(limit: int | None = None) -> list[Path]:
    """The standard library's Python sources, in a fixed order (the same text on every machine of one Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    return files[:limit] if limit else files


def train_tokenizer(vocab_size: int, files: list[Path]) -> Any:
    """A byte-level BPE tokenizer (GPT-2's scheme) wrapped as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")


def llm_config(arch: str, vocab_size: int, *, hidden: int, layers: int, heads: int, kv_heads: int,
               intermediate: int, context: int) -> Any:
    import transformers

    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
                  "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
                  "max_position_embeddings": context, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    return transformers.LlamaConfig(**common, tie_word_embeddings=False)


def build_tiny(name: str, out: Path) -> Path:
    """One small random-weight folder (seconds to build)."""
    import torch
    import transformers

    arch = "qwen2" if name.startswith("qwen2") else "llama"
    tokenizer = train_tokenizer(384 if name == "llama-square" else 512, corpus_files(40))
    if name != "llama":
        tokenizer.chat_template = CHATML
    if name == "llama-long":
        config = llm_config(arch, len(tokenizer), hidden=384, layers=8, heads=6, kv_heads=3, intermediate=1024,
                            context=4096)
    elif name == "llama-square":
        config = llm_config(arch, len(tokenizer), hidden=len(tokenizer), layers=1, heads=6, kv_heads=3,
                            intermediate=128, context=256)
    else:
        config = llm_config(arch, len(tokenizer), hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                            context=256)
    torch.manual_seed(0)
    model_class = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
    model = model_class(config).eval()
    with torch.no_grad():  # larger logits than the default init, so greedy choices are not near-ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.25 if config.hidden_size <= 64 else 0.05)
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


TINY = ("llama", "qwen2", "llama-long", "llama-square")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("var/llms"))
    parser.add_argument("--only", nargs="+", choices=TINY, default=list(TINY))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    for name in args.only:
        print(f"{name}: {build_tiny(name, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
