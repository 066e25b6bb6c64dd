"""Build small Hugging Face model folders offline, the way users save them, for the upload tests.

Usage:
    .venv/bin/python models/build_hf_folders.py --out var/hf-folders

Each folder is `save_pretrained` of a small random-weight config of one supported architecture (safetensors, or
`pytorch_model.bin` for one of them), with a tokenizer trained here with the `tokenizers` library on the GPL's
text (every Debian system carries it) and saved in the form its tokenizer class uses: `tokenizer.json`, WordPiece's
`vocab.txt` alone, or BPE's `vocab.json` + `merges.txt` alone (which transformers converts). Beside each folder,
`<name>.expected.npz` holds what transformers answers for `TEXTS` (the task's output), so the server's answers can
be compared. Also written: folders that must be refused (remote code, an unknown architecture, a missing
tokenizer, a tokenizer larger than the vocabulary, a pickle that would run code).
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Models are compressed and served.",
         "A longer sentence, with punctuation: commas, colons; and a question?"]
VOCAB = 600
HIDDEN = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def corpus() -> list[str]:
    licence = Path("/usr/share/common-licenses/GPL-3")
    text = licence.read_text() if licence.is_file() else " ".join(TEXTS * 200)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines + TEXTS


def wordpiece(folder: Path, files: str) -> Any:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    from tokenizers import decoders
    tokenizer.decoder = decoders.WordPiece()
    fast: PreTrainedTokenizerFast = BertTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                                      pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                                      mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(folder)
    if files == "vocab.txt":  # the slow tokenizer's file alone: transformers builds the fast one from it
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab))
        (folder / "tokenizer.json").unlink()
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "BertTokenizer"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return fast


def byte_bpe(folder: Path, files: str) -> Any:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=VOCAB, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))  # vocab.json + merges.txt: the slow tokenizer's files, converted by transformers
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer",
                                                              "model_max_length": 64}))
    fast = RobertaTokenizerFast.from_pretrained(folder)
    if files != "vocab.json":
        fast.save_pretrained(folder)
    return fast


def unigram(folder: Path, _files: str) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    specials = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus(), trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                                    unk_token="<unk>"))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                             special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.save_pretrained(folder)
    return fast


# name -> (config class, model class, tokenizer builder, tokenizer files, extra config)
FOLDERS: dict[str, tuple[str, str, Any, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertModel", wordpiece, "tokenizer.json", {}),
    "bert-vocab-only": ("BertConfig", "BertModel", wordpiece, "vocab.txt", {}),
    "bert-classifier": ("BertConfig", "BertForSequenceClassification", wordpiece, "tokenizer.json",
                        {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
                         "label2id": {"negative": 0, "neutral": 1, "positive": 2}}),
    "bert-ner": ("BertConfig", "BertForTokenClassification", wordpiece, "tokenizer.json",
                 {"id2label": {0: "O", 1: "B-PER", 2: "I-PER"}, "label2id": {"O": 0, "B-PER": 1, "I-PER": 2}}),
    "roberta": ("RobertaConfig", "RobertaModel", byte_bpe, "vocab.json", {"pad_token_id": 1}),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", unigram, "tokenizer.json", {"pad_token_id": 0}),
    "distilbert": ("DistilBertConfig", "DistilBertModel", wordpiece, "tokenizer.json", {}),
    "mpnet": ("MPNetConfig", "MPNetModel", wordpiece, "tokenizer.json", {"pad_token_id": 0}),
    "electra": ("ElectraConfig", "ElectraModel", wordpiece, "tokenizer.json", {"embedding_size": 32}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", unigram, "tokenizer.json",
                   {"relative_attention": True, "position_buckets": 16, "pos_att_type": ["p2c", "c2p"]}),
    "albert": ("AlbertConfig", "AlbertModel", unigram, "tokenizer.json", {"embedding_size": 16}),
}


def config_for(name: str, class_name: str, vocab: int, extra: dict[str, Any]) -> Any:
    import transformers

    values: dict[str, Any] = {"vocab_size": vocab, "max_position_embeddings": 66, **HIDDEN, **extra}
    if class_name == "DistilBertConfig":
        values = {"vocab_size": vocab, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                  "max_position_embeddings": 66, **extra}
    return getattr(transformers, class_name)(**values)


def build_text(out: Path, name: str) -> None:
    import transformers

    config_class, model_class, make_tokenizer, files, extra = FOLDERS[name]
    folder = out / name
    folder.mkdir(parents=True)
    tokenizer = make_tokenizer(folder, files)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config_for(name, config_class, len(tokenizer), extra)).eval()
    model.save_pretrained(folder)
    if name == "electra":  # weights as torch.save writes them: a pickle of plain tensors
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    _expected(out, name, model, tokenizer, model_class)


def _expected(out: Path, name: str, model: Any, tokenizer: Any, model_class: str) -> None:
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    feeds = {k: v for k, v in encoded.items() if k in accepted}
    with torch.no_grad():
        result = model(**feeds, return_dict=True)
    if model_class.endswith("Model"):
        mask = feeds["attention_mask"].unsqueeze(-1).float()
        answer = (result.last_hidden_state * mask).sum(1) / mask.sum(1)
    else:
        answer = result.logits
    np.savez(out / f"{name}.expected.npz", output=answer.numpy(), mask=feeds["attention_mask"].numpy())


def build_sentence_transformers(out: Path) -> None:
    """The bert folder inside a sentence-transformers layout: CLS pooling, then normalization."""
    folder = out / "sentence-bert"
    shutil.copytree(out / "bert", folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_cls_token": True,
                                                                   "pooling_mode_mean_tokens": False}))
    (folder / "2_Normalize").mkdir()
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = model(**encoded).last_hidden_state[:, 0]
    np.savez(out / "sentence-bert.expected.npz", output=torch.nn.functional.normalize(cls, dim=-1).numpy(),
             mask=encoded["attention_mask"].numpy())


def build_vit(out: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = out / "vit-classifier"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, **HIDDEN, num_labels=2,
                       id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1})
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    np.savez(out / "vit-classifier.expected.npz", output=logits, pixels=pixels)


class _Payload:
    """Pickled, it asks to run a shell command: what a poisoned pytorch_model.bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def build_refused(out: Path) -> None:
    base = out / "bert"
    remote = out / "refused-remote-code"
    shutil.copytree(base, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_evil.py").write_text(f"open({str(out / 'remote-code-ran')!r}, 'w').write('ran')\n")
    unknown = out / "refused-architecture"
    shutil.copytree(base, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (unknown / "config.json").write_text(json.dumps(config))
    missing = out / "refused-no-tokenizer"
    shutil.copytree(base, missing)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (missing / name).unlink(missing_ok=True)
    mismatch = out / "refused-tokenizer-too-large"
    shutil.copytree(base, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["vocab_size"] = 50  # the tokenizer has 600 tokens: ids past 50 have no embedding
    (mismatch / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(mismatch / "model.safetensors")
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"][:50].clone()
    save_file(weights, mismatch / "model.safetensors", metadata={"format": "pt"})
    pickled = out / "refused-pickle"
    shutil.copytree(base, pickled)
    (pickled / "model.safetensors").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({"payload": _Payload(out / "pickle-ran")}, pickled / "pytorch_model.bin")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in FOLDERS:
            build_text(args.out, name)
        build_sentence_transformers(args.out)
        build_vit(args.out)
        build_refused(args.out)
    print(f"built {len(list(args.out.glob('*.expected.npz')))} folders in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
