"""Build the exporter matrix: small models written by the real exporters, the way users' models are written.

Usage:
    .venv/bin/python models/build_exports.py [--out var/exports] [--force] [--only NAME ...]

The test suite builds them once into a cache folder (tests/exports.py); nothing here is committed.

Every model here comes out of a real exporter with its default settings, so the compression tests meet the
graphs users bring rather than graphs shaped by this project:

- Hugging Face transformers models (BERT, RoBERTa, DistilBERT, MPNet, DeBERTa-v2, ViT, and BERT with a
  sequence-classification head) built from small configs with seeded random weights, exported by
  `torch.onnx.export` with the TorchScript exporter (`dynamo=False`, what most export guides and Optimum use)
  and, for BERT and ViT, the dynamo exporter (`dynamo=True`, torch's default);
- a CNN with BatchNorm and residual blocks and an LSTM tagger, through both exporters;
- BERT after onnxruntime's own transformer optimizer (Attention, SkipLayerNormalization, BiasGelu), as users
  upload models they already optimized.

Beside each `<name>.onnx` lies `<name>.samples.npz`: valid inputs (token ids within the vocabulary and
attention masks with padding, images, sequences), one array per input. Nothing is downloaded; weights are
random because these models test graph handling. Fidelity figures come from trained models (see
benchmarks/compression.py).

The real Paddle2ONNX and tf2onnx exports come from elsewhere: PaddleOCR's models ship in the
`rapidocr-onnxruntime` wheel, and `build_tf2onnx.py` (run in its own virtualenv with TensorFlow) writes the committed
`models/tf2onnx_cnn.onnx`.
"""

# ruff: noqa: T201  -- a CLI build script: printing is its interface

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

SEED = 0
OPSET = 17
BATCH, SEQUENCE = 2, 16
SAMPLES = 48
VOCAB = 256
ATOL = 1e-4


@dataclass(frozen=True)
class Export:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[np.random.Generator, int], dict[str, np.ndarray]]
    outputs: list[str]
    dynamo: bool
    dynamic: dict[str, dict[int, str]]


# ---------------------------------------------------------------------------------------------------- inputs


def token_inputs(rng: np.random.Generator, count: int, token_types: bool = True) -> dict[str, np.ndarray]:
    """Token ids in the vocabulary (0 is padding, 1 and 2 stand for [CLS]/[SEP]), masks with trailing padding."""
    ids = rng.integers(3, VOCAB, (count, SEQUENCE)).astype(np.int64)
    lengths = rng.integers(4, SEQUENCE + 1, count)
    mask = (np.arange(SEQUENCE)[None, :] < lengths[:, None]).astype(np.int64)
    ids[:, 0] = 1
    ids[np.arange(count), lengths - 1] = 2
    ids = np.where(mask == 1, ids, 0)
    arrays = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        arrays["token_type_ids"] = np.zeros_like(ids)
    return arrays


def image_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"pixel_values": rng.standard_normal((count, 3, 32, 32)).astype(np.float32)}


def cnn_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"image": rng.standard_normal((count, 3, 32, 32)).astype(np.float32)}


def sequence_inputs(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    return {"features": rng.standard_normal((count, 20, 12)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------------- models


def _hf(factory: Callable[[], nn.Module], names: tuple[str, ...]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return _Outputs(factory(), names)

    return build


class _Outputs(nn.Module):
    """Named tensors out of a transformers ModelOutput, in order, so the exporters see plain tensors."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.names = model, names

    input_names: tuple[str, ...] = ()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.model(**dict(zip(self.input_names, inputs, strict=True)), return_dict=True)
        return tuple(result[name] for name in self.names)


def _transformer_config(kind: str) -> object:
    import transformers as tf

    common = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 64, "max_position_embeddings": 64}
    if kind == "bert":
        return tf.BertConfig(**common)
    if kind == "roberta":
        return tf.RobertaConfig(**{**common, "max_position_embeddings": 66, "pad_token_id": 0})
    if kind == "mpnet":
        return tf.MPNetConfig(**{**common, "max_position_embeddings": 66, "pad_token_id": 0})
    if kind == "deberta-v2":
        return tf.DebertaV2Config(**{**common, "relative_attention": True, "position_buckets": 16,
                                     "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 32})
    if kind == "distilbert":
        return tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=64)
    if kind == "vit":
        return tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64)
    raise ValueError(kind)


def _auto(kind: str, head: str = "AutoModel", attention: str = "eager") -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf

        config = _transformer_config(kind)
        if head == "AutoModelForSequenceClassification":
            config.num_labels = 3  # type: ignore[attr-defined]
        model: nn.Module = getattr(tf, head).from_config(config, attn_implementation=attention)
        return model.eval()

    return build


class ResidualCNN(nn.Module):
    """Conv + BatchNorm + ReLU stem, two residual blocks (one downsampling), global pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = _Block(16, 16, 1)
        self.block2 = _Block(16, 32, 2)
        self.head = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(image)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


class LSTMTagger(nn.Module):
    """Two-layer LSTM over feature frames, a Linear per frame: a sequence labeller."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(12, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(features)
        return self.head(out)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(SEED)
        model = factory().eval()
        with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)
        return model

    return build


_TOKENS = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
           "token_type_ids": {0: "batch", 1: "sequence"}}
_HIDDEN = ("last_hidden_state",)


def _text(name: str, kind: str, dynamo: bool = False, token_types: bool = True, head: str = "AutoModel",
          outputs: tuple[str, ...] = ("last_hidden_state",), attention: str = "eager") -> Export:
    dynamic = {k: v for k, v in _TOKENS.items() if token_types or k != "token_type_ids"}
    return Export(name, _seeded(_hf(_auto(kind, head, attention), outputs)),
                  lambda rng, n: token_inputs(rng, n, token_types), list(outputs), dynamo, dynamic)


EXPORTS = [
    _text("bert.torchscript", "bert"),
    _text("bert.dynamo", "bert", dynamo=True),
    # transformers' default attention: torch.onnx writes scaled_dot_product_attention with a NaN guard and reshapes
    _text("bert-sdpa.torchscript", "bert", attention="sdpa"),
    _text("bert-classifier.torchscript", "bert", head="AutoModelForSequenceClassification", outputs=("logits",)),
    _text("roberta.torchscript", "roberta"),
    _text("distilbert.torchscript", "distilbert", token_types=False),
    _text("mpnet.torchscript", "mpnet", token_types=False),
    _text("deberta-v2.torchscript", "deberta-v2", token_types=False),  # type_vocab_size 0: the exporter drops it
    Export("vit.torchscript", _seeded(_hf(_auto("vit"), ("last_hidden_state",))), image_inputs,
           ["last_hidden_state"], False, {"pixel_values": {0: "batch"}}),
    Export("vit.dynamo", _seeded(_hf(_auto("vit"), ("last_hidden_state",))), image_inputs,
           ["last_hidden_state"], True, {"pixel_values": {0: "batch"}}),
    Export("resnet.torchscript", _seeded(ResidualCNN), cnn_inputs, ["logits"], False, {"image": {0: "batch"}}),
    Export("resnet.dynamo", _seeded(ResidualCNN), cnn_inputs, ["logits"], True, {"image": {0: "batch"}}),
    Export("lstm.torchscript", _seeded(LSTMTagger), sequence_inputs, ["tags"], False,
           {"features": {0: "batch", 1: "frames"}}),
    Export("lstm.dynamo", _seeded(LSTMTagger), sequence_inputs, ["tags"], True,
           {"features": {0: "batch", 1: "frames"}}),
]


# ---------------------------------------------------------------------------------------------------- export


def export(spec: Export, out: Path) -> Path:
    rng = np.random.default_rng(SEED)
    samples = spec.inputs(rng, SAMPLES)
    model = spec.build()
    if isinstance(model, _Outputs):
        model.input_names = tuple(samples)
    example = tuple(torch.from_numpy(v[:BATCH]) for v in samples.values())
    path = out / f"{spec.name}.onnx.partial"  # renamed once checked: a cache never holds a half-built model
    names = list(samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if spec.dynamo:
            shapes: tuple[object, ...] = tuple(dict.fromkeys(spec.dynamic.get(n, {}), torch.export.Dim.DYNAMIC)
                                               for n in names)
            if isinstance(model, _Outputs):  # forward(*inputs): one entry for the varargs
                shapes = (shapes,)
            program = torch.onnx.export(model, example, dynamo=True, input_names=names, output_names=spec.outputs,
                                        dynamic_shapes=shapes, opset_version=18, external_data=False)
            program.save(str(path), external_data=False)
        else:
            axes = {**spec.dynamic, **{o: {0: "batch"} for o in spec.outputs}}
            torch.onnx.export(model, example, str(path), dynamo=False, input_names=names,
                              output_names=spec.outputs, dynamic_axes=axes, opset_version=OPSET)
    _check(path, model, samples)
    np.savez_compressed(out / f"{spec.name}.samples.npz", **samples)
    return path.replace(out / f"{spec.name}.onnx")


def optimized_bert(out: Path) -> Path:
    """BERT through onnxruntime's transformer optimizer, saved as a user would after `optimize_model`."""
    from onnxruntime.transformers.optimizer import optimize_model

    source = out / "bert.torchscript.onnx"
    optimized = optimize_model(str(source), model_type="bert", num_heads=4, hidden_size=32, opt_level=0)
    path = out / "bert.ort-optimized.onnx"
    optimized.save_model_to_file(str(path))
    samples = dict(np.load(out / "bert.torchscript.samples.npz"))
    np.savez_compressed(out / "bert.ort-optimized.samples.npz", **samples)
    reference = ort.InferenceSession(str(source)).run(None, samples)[0]
    got = ort.InferenceSession(str(path)).run(None, samples)[0]
    assert np.allclose(reference, got, atol=ATOL), "the optimizer changed BERT's outputs"
    return path


def _check(path: Path, model: nn.Module, samples: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(*(torch.from_numpy(v) for v in samples.values()))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(None, samples)
    for want, have in zip(expected, got, strict=True):
        error = float(np.max(np.abs(want.numpy() - have)))
        assert error < ATOL, f"{path.name}: onnxruntime differs from PyTorch by {error}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "var" / "exports")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for spec in EXPORTS:
        if args.only and spec.name not in args.only:
            continue
        if (args.out / f"{spec.name}.onnx").exists() and not args.force:
            continue
        path = export(spec, args.out)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")
    if not (args.out / "bert.ort-optimized.onnx").exists() or args.force:
        path = optimized_bert(args.out)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
