"""PyTorch files of the example networks (torch.export archives and TorchScript), built the way users make them."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from tests.helpers import MODELS

CNN_INPUT = {"x": ["batch", 1, 8, 8]}
TRANSFORMER_INPUT = {"input_ids": {"shape": ["batch", "seq"], "dtype": "INT64"},
                     "attention_mask": {"shape": ["batch", "seq"], "dtype": "INT64"}}


def _networks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_models", MODELS / "build_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_models"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def build(folder: Path) -> dict[str, Path]:
    """cnn.pt2, cnn.pt (traced), cnn_static.pt2, transformer.pt2, transformer.pt, plus the two torch.nn.Modules'
    state as plain pickles (state_dict.pt, module.pt) that must be refused."""
    networks = _networks()
    torch.manual_seed(0)
    cnn = networks.DigitsCNN().eval()
    transformer = networks.TinyTransformer().eval()
    x = torch.randn(2, 1, 8, 8)
    ids, mask = torch.randint(0, 1000, (2, 12)), torch.ones(2, 12, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=256)
    files = {name: folder / name for name in ("cnn.pt2", "cnn.pt", "cnn_static.pt2", "transformer.pt2",
                                              "transformer.pt", "state_dict.pt", "module.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(cnn, (x,), dynamic_shapes={"x": {0: batch}}), files["cnn.pt2"])
        torch.export.save(torch.export.export(cnn, (x,)), files["cnn_static.pt2"])
        torch.jit.save(torch.jit.trace(cnn, (x,)), files["cnn.pt"])
        torch.export.save(torch.export.export(transformer, (ids, mask), dynamic_shapes={
            "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}), files["transformer.pt2"])
        torch.jit.save(torch.jit.trace(transformer, (ids, mask)), files["transformer.pt"])
        torch.save(cnn.state_dict(), files["state_dict.pt"])
        torch.save(cnn, files["module.pt"])
    return files


def reference(file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """What PyTorch itself computes, from the saved file (TorchScript or torch.export)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if file.suffix == ".pt":
            module = torch.jit.load(str(file))
        else:
            module = torch.export.load(str(file)).module()  # our own test file: safe to load with torch
        out: torch.Tensor = module(*(torch.from_numpy(v) for v in feeds.values()))
    return out.numpy()
