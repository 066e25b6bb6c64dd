"""Recognise Keras files by their bytes and vet them before Keras ever reads them.

Keras' own `safe_mode` has had bypasses, so nothing from a user's file reaches Keras until this module has checked
its model config, in pure Python, against an allowlist of built-in classes: no Lambda (marshalled Python code), no
custom or registered objects, no modules outside Keras, no layer that opens a path (TFSMLayer) or unpickles
(TorchModuleWrapper). The weights file is checked for HDF5 links and storage that point at other files. Only
h5py (which parses HDF5 and runs nothing from it) is imported here; the worker converts the vetted file in a
child process (`keras_convert`).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import InvalidContent, UnsupportedFormat

KERAS = "keras"
KERAS_H5 = "keras-h5"
SUFFIXES = {KERAS: ".keras", KERAS_H5: ".h5"}

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TFLITE_MARK = b"TFL3"  # a .tflite flatbuffer's file identifier, at offset 4
_KERAS_MEMBERS = {"config.json", "metadata.json", "model.weights.h5"}
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MAX_WEIGHTS_BYTES = 8 * 1024 * 1024 * 1024

_SAVE_AS_KERAS = ("save the model with model.save('model.keras') (Keras 3), or export ONNX "
                  "(tf2onnx, or keras' model.export(path, format='onnx'))")

# Layers whose computation is built-in tensor math that the torch backend exports.
LAYERS = frozenset({
    "InputLayer", "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "BatchNormalization",
    "LayerNormalization", "GroupNormalization", "UnitNormalization", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Flatten",
    "Reshape", "Permute", "RepeatVector", "Identity", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D",
    "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "UpSampling1D",
    "UpSampling2D", "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "Add", "Subtract", "Multiply",
    "Average", "Maximum", "Minimum", "Concatenate", "Dot", "Embedding", "LSTM", "GRU", "MultiHeadAttention",
    "Rescaling", "Normalization",
})
MODELS = frozenset({"Sequential", "Functional", "Model"})
# Objects a layer's config holds: initializers, regularizers, constraints, dtype policies, serialized tensors.
_CONFIG_OBJECTS = {
    "keras.initializers": {"Constant", "GlorotNormal", "GlorotUniform", "HeNormal", "HeUniform", "Identity",
                           "LecunNormal", "LecunUniform", "Ones", "Orthogonal", "RandomNormal", "RandomUniform",
                           "TruncatedNormal", "VarianceScaling", "Zeros", "STFTInitializer"},
    "keras.regularizers": {"L1", "L2", "L1L2", "OrthogonalRegularizer"},
    "keras.constraints": {"MaxNorm", "MinMaxNorm", "NonNeg", "UnitNorm"},
    "keras": {"DTypePolicy", "FloatDTypePolicy"},
}
_SERIALIZED_VALUES = {"__keras_tensor__", "__tuple__", "__numpy__", "__bytes__", "__ellipsis__", "__slice__"}
ACTIVATIONS = frozenset({
    "linear", "relu", "relu6", "sigmoid", "hard_sigmoid", "tanh", "softmax", "log_softmax", "softplus", "softsign",
    "elu", "selu", "gelu", "silu", "swish", "hard_silu", "hard_swish", "leaky_relu", "mish", "exponential",
    "celu", "glu", "hard_tanh", "hard_shrink", "soft_shrink", "tanh_shrink", "sparse_plus", "squareplus",
    "sparsemax", "threshold", "log_sigmoid",
})
_ACTIVATION_KEYS = ("activation", "recurrent_activation")

# Refused with what the user can do instead.
_NEEDS_TENSORFLOW = {"StringLookup", "IntegerLookup", "TextVectorization", "Hashing", "HashedCrossing",
                     "Discretization", "CategoryEncoding"}
_REFUSED = {
    "Lambda": "it holds Python code (marshalled bytecode), which SlimServe never runs; replace it with built-in "
              "layers",
    "TFSMLayer": "it loads a TensorFlow SavedModel from a path; upload that model as ONNX instead",
    "TorchModuleWrapper": "it carries a pickled torch module, which SlimServe never unpickles; export the model "
                          "with torch.export (.pt2) instead",
    "SimpleRNN": "its time loop exports only at a fixed sequence length; use LSTM or GRU",
    "Bidirectional": "bidirectional RNNs are not converted yet; export the model as ONNX",
    "TimeDistributed": "it is not converted yet; export the model as ONNX",
    "Masking": "masks are not exported; pad with values the model is trained on instead",
}


@dataclass(frozen=True)
class KerasSummary:
    kind: str
    model_class: str
    layers: dict[str, int]
    """Layer class -> how many the model has."""
    recurrent: bool
    keras_version: str | None

    def to_json(self) -> dict[str, Any]:
        return {"model_class": self.model_class, "layers": self.layers, "recurrent": self.recurrent,
                "keras_version": self.keras_version}


def sniff(path: Path, filename: str, label: str) -> str | None:
    """KERAS or KERAS_H5 for a Keras file; None for anything else; a 415 for TensorFlow formats we refuse."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if head[4:8] == _TFLITE_MARK or suffix == ".tflite":
        raise UnsupportedFormat(f"{label} is a TensorFlow Lite model, which SlimServe does not convert (it would "
                                f"need TensorFlow in the server); {_SAVE_AS_KERAS}", code="tensorflow_format")
    if suffix == ".pb":
        raise UnsupportedFormat(f"{label} is a TensorFlow graph or SavedModel, which SlimServe does not convert; "
                                f"{_SAVE_AS_KERAS}", code="tensorflow_format")
    if head == _HDF5_MAGIC:
        return KERAS_H5
    if head[:4] == _ZIP_MAGIC and suffix == ".keras":
        return KERAS
    if head[:4] == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                names = set(archive.namelist())
        except zipfile.BadZipFile:
            return None
        return KERAS if {"config.json", "model.weights.h5"} <= names else None
    if suffix in (".keras", ".h5", ".hdf5"):
        raise UnsupportedFormat(f"{label} has a Keras extension but is neither a Keras zip nor HDF5")
    return None


def refuse_saved_model(root: Path, label: str) -> None:
    """An unpacked archive holding a TensorFlow SavedModel is refused with what to do instead."""
    if (root / "saved_model.pb").is_file() or (root / "saved_model.pbtxt").is_file():
        raise UnsupportedFormat(f"{label} holds a TensorFlow SavedModel, which SlimServe does not convert (it would "
                                f"need TensorFlow in the server); {_SAVE_AS_KERAS}", code="tensorflow_format")


def vet(path: Path, kind: str, label: str, scratch: Path) -> KerasSummary:
    """Check the file's members, its config against the allowlist and its weights for outside references.

    `scratch` is an empty folder this may write the weights file of a .keras zip into to check it."""
    if kind == KERAS:
        config, version = _read_keras_zip(path, label, scratch)
    else:
        config, version = _read_h5_config(path, label)
        _check_hdf5(path, label)
    if not isinstance(config, dict) or config.get("class_name") not in MODELS:
        found = config.get("class_name") if isinstance(config, dict) else type(config).__name__
        raise InvalidContent(f"{label}: the top-level object is {str(found)[:60]!r}, not a Keras Sequential or "
                             "functional model", code="unsafe_model")
    layers: dict[str, int] = {}
    _vet_object(config, "model", label, layers)
    return KerasSummary(kind=kind, model_class=str(config["class_name"]), layers=dict(sorted(layers.items())),
                        recurrent=bool({"LSTM", "GRU"} & layers.keys()), keras_version=version)


def _read_keras_zip(path: Path, label: str, scratch: Path) -> tuple[Any, str | None]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidContent(f"{label} is not a valid Keras zip file") from None
    with archive:
        infos = archive.infolist()
        for info in infos:
            name = info.filename
            if name not in _KERAS_MEMBERS:
                raise InvalidContent(f"{label}: member {name[:200]!r} is not part of a Keras model file (expected "
                                     "config.json, metadata.json and model.weights.h5 only)", code="unsafe_model")
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise InvalidContent(f"{label}: member {name!r} is a symbolic link", code="unsafe_model")
        sizes = {info.filename: info.file_size for info in infos}
        if "config.json" not in sizes or "model.weights.h5" not in sizes:
            raise InvalidContent(f"{label} lacks config.json or model.weights.h5: not a whole Keras model "
                                 "(save it with model.save('model.keras'))")
        if sizes["config.json"] > MAX_CONFIG_BYTES or sizes.get("metadata.json", 0) > MAX_CONFIG_BYTES:
            raise InvalidContent(f"{label}: config.json is over {MAX_CONFIG_BYTES >> 20} MiB")
        if sizes["model.weights.h5"] > MAX_WEIGHTS_BYTES:
            raise InvalidContent(f"{label}: model.weights.h5 is over {MAX_WEIGHTS_BYTES >> 30} GiB")
        config = _json(archive.read("config.json"), f"{label}: config.json")
        metadata = _json(archive.read("metadata.json"), f"{label}: metadata.json") if "metadata.json" in sizes else {}
        weights = scratch / "model.weights.h5"
        with archive.open("model.weights.h5") as source, open(weights, "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
    _check_hdf5(weights, f"{label}: model.weights.h5")
    version = metadata.get("keras_version") if isinstance(metadata, dict) else None
    return config, str(version) if version is not None else None


def _read_h5_config(path: Path, label: str) -> tuple[Any, str | None]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            raw = handle.attrs.get("model_config")
            version = handle.attrs.get("keras_version")
    except OSError as exc:
        raise InvalidContent(f"{label} is not a readable HDF5 file: {str(exc)[:200]}") from None
    if raw is None:
        raise InvalidContent(f"{label} holds weights only (no model_config): save the whole model with "
                             "model.save('model.keras')", code="weights_only")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if len(text) > MAX_CONFIG_BYTES:
        raise InvalidContent(f"{label}: model_config is over {MAX_CONFIG_BYTES >> 20} MiB")
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    return _json(text, f"{label}: model_config"), str(version) if version is not None else None


def _check_hdf5(path: Path, label: str) -> None:
    """Refuse HDF5 that reaches outside itself: external links, external storage, virtual datasets."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InvalidContent(f"{label} is not a readable HDF5 file: {str(exc)[:200]}") from None
    with handle:
        pending: list[h5py.Group] = [handle]
        while pending:
            group = pending.pop()
            for key in group:
                where = f"{group.name.rstrip('/')}/{key}"
                link = group.get(key, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    raise InvalidContent(f"{label}: {where!r} is a link to another file ({link.filename[:200]!r})",
                                         code="unsafe_model")
                if isinstance(link, h5py.SoftLink):
                    continue  # points inside this file; walking it would visit the target twice
                item = group[key]
                if isinstance(item, h5py.Group):
                    pending.append(item)
                elif isinstance(item, h5py.Dataset) and (item.external or item.is_virtual):
                    raise InvalidContent(f"{label}: dataset {where!r} stores its data in another file",
                                         code="unsafe_model")


def _json(raw: bytes | str, label: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidContent(f"{label} is not valid JSON: {str(exc)[:200]}") from None


def _vet_object(value: Any, where: str, label: str, layers: dict[str, int]) -> None:
    """Walk every nested value; every serialized object must be an allowed built-in."""
    if isinstance(value, list):
        for index, item in enumerate(value):
            _vet_object(item, f"{where}[{index}]", label, layers)
        return
    if not isinstance(value, dict):
        return
    if "class_name" in value:
        _vet_class(value, where, label, layers)
    for key, item in value.items():
        if key == "compile_config":
            continue  # never deserialized: the worker loads with compile=False
        if key in _ACTIVATION_KEYS and isinstance(item, str) and item not in ACTIVATIONS:
            raise InvalidContent(f"{label}: {where}.{key} is {item[:80]!r}, not a built-in Keras activation",
                                 code="unsafe_model")
        _vet_object(item, f"{where}.{key}", label, layers)


def _vet_class(value: dict[str, Any], where: str, label: str, layers: dict[str, int]) -> None:
    name = value.get("class_name")
    module = value.get("module")
    registered = value.get("registered_name")
    config = value.get("config")
    shown = str(name)[:80]
    if not isinstance(name, str):
        raise InvalidContent(f"{label}: {where} has a class_name that is not a string", code="unsafe_model")
    if name in _SERIALIZED_VALUES:
        return
    layer_name = config.get("name") if isinstance(config, dict) else None
    at = f"layer {layer_name!r} ({shown})" if isinstance(layer_name, str) else f"{where} ({shown})"
    if name in _REFUSED:
        raise InvalidContent(f"{label}: {at} is refused: {_REFUSED[name]}", code="unsafe_model")
    if name in _NEEDS_TENSORFLOW:
        raise InvalidContent(f"{label}: {at} needs TensorFlow to load, which SlimServe's server does not run; do "
                             "this preprocessing before the model, or export ONNX", code="needs_tensorflow")
    if name == "function":
        # An activation passed as a function: {"module": "keras.activations", "config": "relu"}.
        if module != "keras.activations" or config not in ACTIVATIONS:
            raise InvalidContent(f"{label}: {where} is a function {str(config)[:80]!r} from "
                                 f"{str(module)[:80]!r}, not a built-in Keras activation", code="unsafe_model")
        return
    if registered is not None and registered != name:
        raise InvalidContent(f"{label}: {at} is a custom object (registered as {str(registered)[:80]!r}); "
                             "SlimServe loads built-in Keras classes only", code="unsafe_model")
    if module is not None and not (isinstance(module, str) and (module == "keras" or module.startswith("keras."))):
        raise InvalidContent(f"{label}: {at} names the module {str(module)[:80]!r}; only Keras' own modules "
                             "are allowed", code="unsafe_model")
    if name in LAYERS or name in MODELS:
        layers[name] = layers.get(name, 0) + 1
        if name in ("LSTM", "GRU") and isinstance(config, dict):
            _vet_recurrent(name, config, at, label)
        return
    allowed = _CONFIG_OBJECTS.get(module if isinstance(module, str) else "", set())
    if module is None and any(name in classes for classes in _CONFIG_OBJECTS.values()):
        return  # legacy .h5 configs name no module
    if name in allowed:
        return
    raise InvalidContent(f"{label}: {at} is not a built-in Keras layer SlimServe converts", code="unsafe_model")


def _vet_recurrent(name: str, config: dict[str, Any], at: str, label: str) -> None:
    """LSTM/GRU convert to ONNX's LSTM/GRU ops, which keep the time axis dynamic, in their standard form only."""
    problems = []
    if config.get("activation", "tanh") != "tanh" or config.get("recurrent_activation", "sigmoid") != "sigmoid":
        problems.append("activation tanh and recurrent_activation sigmoid")
    if config.get("stateful"):
        problems.append("stateful=False")
    if config.get("unroll"):
        problems.append("unroll=False")
    if config.get("return_state"):
        problems.append("return_state=False")
    if name == "GRU" and config.get("reset_after", True) is not True:
        problems.append("reset_after=True")
    if problems:
        raise InvalidContent(f"{label}: {at} converts with a dynamic time axis only with "
                             f"{', '.join(problems)}", code="unsupported_layer")
