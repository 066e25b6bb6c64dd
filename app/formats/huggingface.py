"""Hugging Face model folders, vetted in the server without transformers: what the folder is, and whether it is safe.

The server reads only JSON and bytes here. It refuses configs that would need code from the upload (`auto_map`,
an architecture transformers does not ship or SlimServe does not convert), weights that are not safetensors or a
`pytorch_model.bin` whose pickle names only what `torch.load(weights_only=True)` allows, and folders without a
tokenizer. The conversion itself (transformers, torch.onnx) runs in the worker (`hf_convert`).
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import InvalidContent, UnsupportedFormat
from app.formats import causal_lm

MAX_JSON_BYTES = 16 * 1024 * 1024
TASKS = ("embeddings", "classification", "token-classification")
GENERATION = "generation"
DEFAULT_MAX_CONTEXT = 131_072

# model_type -> transformers' class prefix
MODEL_TYPES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "distilbert": "DistilBert",
               "mpnet": "MPNet", "electra": "Electra", "deberta-v2": "DebertaV2", "albert": "Albert", "vit": "ViT"}
# head -> the task it serves (a masked-LM or pre-training checkpoint serves its encoder's embeddings)
TEXT_HEADS = {"Model": "embeddings", "ForMaskedLM": "embeddings", "ForPreTraining": "embeddings",
              "ForSequenceClassification": "classification", "ForTokenClassification": "token-classification"}
IMAGE_HEADS = {"Model": "embeddings", "ForImageClassification": "classification"}
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "spm.model", "tokenizer.model")
# What torch.load(weights_only=True) unpickles: tensors rebuilt from storages, ordered dicts, dtypes and devices.
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "device"), ("torch", "Size"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch", "Tensor"), ("torch.nn.parameter", "Parameter"),
    *{("torch", f"{kind}Storage") for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                                              "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")},
    *{("torch", dtype) for dtype in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8",
                                     "bool")},
}


@dataclass(frozen=True)
class HuggingFaceFolder:
    architecture: str
    model_type: str
    task: str
    weights: list[str]
    """Relative paths of the weight files: safetensors shards, or pytorch_model.bin shards."""
    tokenizer: list[str]
    pooling: str | None
    """Sentence-transformers pooling (`mean`, `cls`, `max`); None when the folder has no modules.json."""
    normalize: bool
    image: bool
    labels: dict[str, str]
    max_length: int | None = None
    """sentence-transformers' max_seq_length, when the folder says it."""
    generation: dict[str, Any] | None = None
    """A causal LM's context length, chat template and special tokens (`causal_lm.CausalLM`)."""

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "model_type": self.model_type, "task": self.task,
                "weights": self.weights, "tokenizer": self.tokenizer, "pooling": self.pooling,
                "normalize": self.normalize, "image": self.image, "labels": self.labels,
                "max_length": self.max_length, "generation": self.generation}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HuggingFaceFolder:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def is_huggingface(root: Path) -> bool:
    return (root / "config.json").is_file()


def inspect(root: Path, *, label: str, task: str | None,
            max_context: int = DEFAULT_MAX_CONTEXT) -> HuggingFaceFolder:
    """What the folder holds, or a 4xx naming what is refused."""
    config = read_json(root / "config.json", label)
    if not isinstance(config, dict):
        raise InvalidContent(f"{label}: config.json is not a JSON object")
    if "auto_map" in config:
        raise InvalidContent(f"{label}: config.json has an 'auto_map', which loads model code shipped in the folder "
                             "(trust_remote_code); SlimServe never runs code from an upload", code="remote_code")
    if causal_lm.is_causal_lm(config):
        return _inspect_causal_lm(root, config, label, task, max_context)
    model_type = str(config.get("model_type", ""))
    architectures = config.get("architectures") or []
    architecture = str(architectures[0]) if isinstance(architectures, list) and architectures else ""
    if model_type not in MODEL_TYPES:
        raise InvalidContent(f"{label}: model type '{model_type[:64]}' ({architecture or 'no architecture'}) is "
                             f"not supported; supported: {', '.join(MODEL_TYPES)}", code="unsupported_architecture")
    prefix = MODEL_TYPES[model_type]
    if not architecture:
        architecture = f"{prefix}Model"
    image = model_type == "vit"
    heads = IMAGE_HEADS if image else TEXT_HEADS
    head = architecture[len(prefix):] if architecture.startswith(prefix) else None
    if head is None or head not in heads:
        raise InvalidContent(f"{label}: architecture '{architecture[:80]}' is not supported; for {model_type}: "
                             f"{', '.join(prefix + h for h in heads)}", code="unsupported_architecture")
    inferred = heads[head]
    modules = _sentence_transformers(root, label)
    chosen = task or inferred
    if chosen not in TASKS:
        raise InvalidContent(f"task '{chosen[:40]}' is not one SlimServe serves; tasks: {', '.join(TASKS)}, "
                             f"{GENERATION} (causal LMs)")
    if chosen != inferred:
        raise InvalidContent(f"{label}: '{architecture}' has no head for task '{chosen}' (it serves '{inferred}')")
    tokenizer = [] if image else _tokenizer_files(root, label)
    labels = config.get("id2label") or {}
    sentence_config = read_json(root / "sentence_bert_config.json", label) \
        if (root / "sentence_bert_config.json").is_file() else {}
    max_length = sentence_config.get("max_seq_length") if isinstance(sentence_config, dict) else None
    return HuggingFaceFolder(
        architecture=architecture, model_type=model_type, task=chosen, weights=_weights(root, label),
        tokenizer=tokenizer, pooling=(modules or {}).get("pooling") if chosen == "embeddings" else None,
        normalize=bool((modules or {}).get("normalize")), image=image,
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        max_length=int(max_length) if isinstance(max_length, int) and max_length > 0 else None,
    )


def _inspect_causal_lm(root: Path, config: dict[str, Any], label: str, task: str | None,
                       max_context: int) -> HuggingFaceFolder:
    if task not in (None, GENERATION):
        raise InvalidContent(f"{label}: a causal LM serves task '{GENERATION}', not '{str(task)[:40]}'")
    found = causal_lm.inspect(root, config, label=label, max_context=max_context)
    return HuggingFaceFolder(
        architecture=found.architecture, model_type=found.model_type, task=GENERATION, weights=_weights(root, label),
        tokenizer=_tokenizer_files(root, label), pooling=None, normalize=False, image=False, labels={},
        generation={"context_length": found.context_length, "chat_template": found.chat_template,
                    "bos_token": found.bos_token, "eos_token": found.eos_token},
    )


def read_json(path: Path, label: str) -> Any:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise InvalidContent(f"{label}: {path.name} is larger than {MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidContent(f"{label}: {path.name} is not valid JSON ({exc})") from None


def _sentence_transformers(root: Path, label: str) -> dict[str, Any] | None:
    """Pooling and normalization from a sentence-transformers layout (modules.json), or None."""
    if not (root / "modules.json").is_file():
        return None
    modules = read_json(root / "modules.json", label)
    if not isinstance(modules, list):
        raise InvalidContent(f"{label}: modules.json is not a list of modules")
    found: dict[str, Any] = {"pooling": "mean", "normalize": False}
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        if kind.endswith("models.Transformer"):
            continue
        if kind.endswith("models.Pooling"):
            path = _inside(root, str(module.get("path", "")), label) / "config.json"
            config = read_json(path, label) if path.is_file() else {}
            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens") if config.get(f"pooling_mode_{m}")]
            if len(modes) > 1:
                raise UnsupportedFormat(f"{label}: pooling that combines {', '.join(modes)} is not supported")
            found["pooling"] = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(
                modes[0] if modes else "mean_tokens", "mean")
        elif kind.endswith("models.Normalize"):
            found["normalize"] = True
        else:
            raise UnsupportedFormat(f"{label}: the sentence-transformers module '{kind[:80]}' is not supported "
                                    "(Transformer, Pooling and Normalize are)")
    return found


def _inside(root: Path, relative: str, label: str) -> Path:
    """A path named by a file of the folder, confined to the folder."""
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if relative.startswith("/") or ".." in parts:
        raise InvalidContent(f"{label}: '{relative[:100]}' points outside the folder")
    return root.joinpath(*parts)


def _weights(root: Path, label: str) -> list[str]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (root / index_name).is_file():
            index = read_json(root / index_name, label)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise InvalidContent(f"{label}: {index_name} has no weight_map")
            shards = sorted({str(v) for v in weight_map.values()})
            for shard in shards:
                if not _inside(root, shard, label).is_file():
                    raise InvalidContent(f"{label}: {index_name} names the shard '{shard[:100]}', which the folder "
                                         "does not hold")
            if single.endswith(".bin"):
                for shard in shards:
                    vet_pickle(_inside(root, shard, label), label)
            return shards
        if (root / single).is_file():
            if single.endswith(".bin"):
                vet_pickle(root / single, label)
            return [single]
    if any(root.glob("*.h5")) or any(root.glob("*.msgpack")):
        raise UnsupportedFormat(f"{label} holds TensorFlow or Flax weights only; save the model with "
                                "save_pretrained(..., safe_serialization=True) from PyTorch")
    raise InvalidContent(f"{label} has no weights: model.safetensors (or shards with their index) or "
                         "pytorch_model.bin")


def vet_pickle(path: Path, label: str) -> None:
    """Refuse a pytorch_model.bin whose pickle names anything `torch.load(weights_only=True)` would not allow.

    Read opcode by opcode (pickletools), never unpickled: a file that would run code is refused before any
    loader sees it, and the worker then loads it with weights_only=True all the same.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise InvalidContent(f"{label}: {path.name} is not a torch.save archive")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile:
        raise UnsupportedFormat(f"{label}: {path.name} is a legacy (non-zip) pickle, which cannot be vetted; "
                                "save the weights as safetensors", code="pickle_refused") from None
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(argument))
            elif opcode.name == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                _allow(module, name, path, label)
            elif opcode.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    raise InvalidContent(f"{label}: {path.name} builds an object from a computed name")
                _allow(strings[-2], strings[-1], path, label)
            elif opcode.name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise UnsupportedFormat(f"{label}: {path.name} instantiates objects ({opcode.name}); refused",
                                        code="pickle_refused")
    except ValueError as exc:
        raise InvalidContent(f"{label}: {path.name} is a corrupt pickle ({exc})") from None


def _allow(module: str, name: str, path: Path, label: str) -> None:
    if (module, name) not in _SAFE_GLOBALS:
        raise UnsupportedFormat(
            f"{label}: {path.name} refers to '{module[:60]}.{name[:60]}', which torch.load(weights_only=True) does "
            "not load; pickles can run code, so only plain tensors are accepted (or save as safetensors)",
            code="pickle_refused")


def _tokenizer_files(root: Path, label: str) -> list[str]:
    found = [name for name in _TOKENIZER_FILES if (root / name).is_file()]
    if not found:
        raise InvalidContent(f"{label} has no tokenizer: tokenizer.json, or the files its tokenizer class needs "
                             "(vocab.txt, vocab.json + merges.txt, or a SentencePiece model)", code="no_tokenizer")
    if "vocab.json" in found and not (root / "merges.txt").is_file() and "tokenizer.json" not in found:
        raise InvalidContent(f"{label}: vocab.json without merges.txt is not a complete BPE tokenizer")
    return found
