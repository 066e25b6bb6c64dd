"""Models as real exporters write them, for the compression tests: built once, cached, located on disk.

- `exporter_models()`: models/build_exports.py's Hugging Face encoders, CNNs and LSTMs through torch.onnx's
  TorchScript and dynamo exporters (and BERT through onnxruntime's optimizer), built in a child process into
  var/exports-cache/<key>, where the key covers the script and the exporters' versions: a clean checkout builds
  them once (about 15 s), later runs reuse them.
- `llm_folders()`: models/build_llms.py's small Llama and Qwen2 folders with a trained BPE tokenizer.
- `TF2ONNX_CNN`: a Keras CNN written by tf2onnx (committed; TensorFlow may not live in this environment).
- `paddle_models()`: PaddleOCR's detection, recognition and orientation models as Paddle2ONNX wrote them (weights in
  `Constant` nodes, opsets 11/12), from the rapidocr-onnxruntime wheel, found without importing it.
- `silero_vad()`: the Silero voice-activity model (an LSTM inside `If` branches, an integer `sr` input).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.helpers import MODELS, REPO

TF2ONNX_CNN = MODELS / "tf2onnx_cnn.onnx"
EXPORTS = ("bert.torchscript", "bert.dynamo", "bert-classifier.torchscript", "roberta.torchscript",
           "distilbert.torchscript", "mpnet.torchscript", "deberta-v2.torchscript", "vit.torchscript", "vit.dynamo",
           "resnet.torchscript", "resnet.dynamo", "lstm.torchscript", "lstm.dynamo", "bert.ort-optimized")
_BUILDER = MODELS / "build_exports.py"


def _key() -> str:
    digest = hashlib.sha256(_BUILDER.read_bytes())
    for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def exporter_models() -> Path:
    """The folder holding `<name>.onnx` and `<name>.samples.npz` for every name in EXPORTS."""
    return _built(_BUILDER, REPO / "var" / "exports-cache" / _key())


def hf_folders() -> Path:
    """models/build_hf_folders.py's folders (and `<name>.expected.npz` answers), built once into a cache."""
    builder = MODELS / "build_hf_folders.py"
    digest = hashlib.sha256(builder.read_bytes())
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    return _built(builder, REPO / "var" / "hf-folders-cache" / digest.hexdigest()[:16])


def llm_folders() -> Path:
    """models/build_llms.py's small causal-LM folders (Llama, Qwen2, a Llama without chat template), cached."""
    builder = MODELS / "build_llms.py"
    digest = hashlib.sha256(builder.read_bytes())
    for package in ("torch", "transformers", "tokenizers", "safetensors"):
        digest.update(f"{package}={importlib.metadata.version(package)}".encode())
    digest.update(sys.version.encode())  # the tokenizer is trained on this Python's standard library
    return _built(builder, REPO / "var" / "llm-folders-cache" / digest.hexdigest()[:16])


def _built(builder: Path, cache: Path) -> Path:
    """`builder --out` run once into `cache`, which is whole or absent: two sessions never see half of one."""
    if (cache / "done").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=cache.parent))
    try:
        subprocess.run([sys.executable, str(builder), "--out", str(scratch)], check=True, cwd=REPO,
                       capture_output=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        (scratch / "done").write_text("")
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(scratch, cache)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return cache


def zip_folder(folder: Path, inside: str | None = None) -> bytes:
    """The folder as users zip it: every file under one top-level directory (or at the root)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                relative = path.relative_to(folder).as_posix()
                bundle.write(path, f"{inside}/{relative}" if inside else relative)
    return buffer.getvalue()


def _package_file(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return path if path.is_file() else None


def paddle_models() -> dict[str, Path]:
    names = {"det": "ch_PP-OCRv4_det_infer.onnx", "rec": "ch_PP-OCRv4_rec_infer.onnx",
             "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx"}
    found = {kind: _package_file("rapidocr_onnxruntime", "models", name) for kind, name in names.items()}
    return {kind: path for kind, path in found.items() if path is not None}


def text_images(count: int, height: int, width: int, seed: int = 0, font_size: int | None = None) -> np.ndarray:
    """[count, 3, height, width] renderings of lines of text in PaddleOCR's normalization ([-1, 1]): what its
    models see, unlike noise (words from the GPL's text, which every Debian system carries, or a fixed phrase)."""
    from PIL import Image, ImageDraw, ImageFont

    licence = Path("/usr/share/common-licenses/GPL-3")
    words = licence.read_text().split() if licence.is_file() else "the quick brown fox jumps over a lazy dog".split()
    rng = np.random.default_rng(seed)
    size = font_size or max(10, height // 2)
    font = ImageFont.load_default(size=size)
    images = []
    for _ in range(count):
        image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(180, 256, 3)))
        draw = ImageDraw.Draw(image)
        for top in range(2, max(height - size, 3), size + 6):
            start = int(rng.integers(0, len(words) - 6))
            draw.text((int(rng.integers(0, 12)), top), " ".join(words[start:start + 5]), font=font,
                      fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        images.append(((pixels - 0.5) / 0.5).transpose(2, 0, 1))
    return np.stack(images).astype(np.float32)


def silero_vad() -> Path | None:
    return _package_file("silero_vad", "data", "silero_vad.onnx")


def silero_vad_script() -> Path | None:
    """Silero's TorchScript release: forward(x: Tensor, sr: int), keeping its recurrent state between calls."""
    return _package_file("silero_vad", "data", "silero_vad.jit")
