"""PyTorch files of the example networks (torch.export archives and TorchScript), built the way users make them.

Everything here runs in `TorchProcess`, a spawned child: torch.export, TorchScript and the exporter (and the
sklearn/scipy stack that build_models.py imports) stay out of the pytest process, which hosts onnxruntime sessions,
in-process servers and their threads. A native crash there then fails the test that caused it, by name, instead of
aborting the whole run.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import multiprocessing
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from tests.helpers import MODELS

T = TypeVar("T")

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
        traced_cnn = torch.jit.trace(cnn, (x,))  # type: ignore[no-untyped-call]
        torch.jit.save(traced_cnn, files["cnn.pt"])
        torch.export.save(torch.export.export(transformer, (ids, mask), dynamic_shapes={
            "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}), files["transformer.pt2"])
        traced_transformer = torch.jit.trace(transformer, (ids, mask))  # type: ignore[no-untyped-call]
        torch.jit.save(traced_transformer, files["transformer.pt"])
        torch.save(cnn.state_dict(), files["state_dict.pt"])
        torch.save(cnn, files["module.pt"])
    return files


def reference(file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """What PyTorch itself computes, from the saved file (TorchScript or torch.export)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if file.suffix == ".pt":
            module = torch.jit.load(str(file))  # type: ignore[no-untyped-call]
        else:
            module = torch.export.load(str(file)).module()  # our own test file: safe to load with torch
        out: torch.Tensor = module(*(torch.from_numpy(v) for v in feeds.values()))
    return out.numpy()


def convert_file(source: Path, output: Path, samples: dict[str, np.ndarray] | None = None,
                 input_shapes: Any = None) -> Any:
    """The worker's conversion of `source` (recognised by its bytes) to `output`; returns its Conversion."""
    from app.formats.torch_archive import sniff
    from app.formats.torch_convert import convert

    archive = sniff(source, source.name, "the file")
    assert archive is not None
    return convert(source, archive.kind, output, label="the file", progress=lambda fraction, step: None,
                   samples=samples, input_shapes=input_shapes)


def save_file_reader(path: Path) -> None:
    """A scripted module that reads a file from disk when run (aten::from_file)."""

    class Reader(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.from_file("/etc/hostname", size=1, dtype=torch.uint8).float()

    torch.jit.save(torch.jit.script(Reader()), str(path))


class _Baked(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x.reshape(int(x.shape[0]), 8))  # int() freezes the traced batch size
        return out


def save_baked_trace(path: Path) -> None:
    """A trace at batch 2 that is right only at batch 2."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about exactly this
        traced = torch.jit.trace(_Baked().eval(), torch.randn(2, 2, 4))  # type: ignore[no-untyped-call]
        torch.jit.save(traced, str(path))


class _SampleRate(torch.nn.Module):
    """A scripted model with Python scalar arguments that change its graph (as audio models take a sample rate)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, sr: int, gain: float) -> torch.Tensor:
        out: torch.Tensor = self.linear(x) * gain if sr == 16000 else self.linear(x.flip(1)) - gain
        return out


def save_sample_rate_script(path: Path) -> None:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_SampleRate().eval()), str(path))


class _CountsTrainingSteps(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.steps = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps = self.steps + 1  # state, but only while training
        out: torch.Tensor = self.norm(self.conv(x))
        return out


def save_training_counter_script(path: Path) -> None:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_CountsTrainingSteps().eval()), str(path))


def reference_with_scalars(file: Path, x: np.ndarray, sr: int, gain: float) -> np.ndarray:
    with torch.no_grad():
        out: torch.Tensor = torch.jit.load(str(file))(torch.from_numpy(x), sr, gain)  # type: ignore[no-untyped-call]
    return out.numpy()


class _TwoHeads(torch.nn.Module):
    """Class scores and a probability head, returned as a dict or as a tuple."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.logits = torch.nn.Linear(4, 3)
        self.probs = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> Any:
        logits, probs = self.logits(x), torch.softmax(self.probs(x), dim=-1)
        return {"logits": logits, "probs": probs} if self.as_dict else (logits, probs)


def save_two_heads(folder: Path) -> dict[str, Path]:
    """dict.pt2 and dict.pt (a dict of two outputs), tuple.pt (a tuple of two)."""
    torch.manual_seed(0)
    x, batch = torch.randn(2, 4), torch.export.Dim("batch")
    files = {name: folder / name for name in ("dict.pt2", "dict.pt", "tuple.pt")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(_TwoHeads(True).eval(), (x,), dynamic_shapes={"x": {0: batch}}),
                          files["dict.pt2"])
        as_dict = torch.jit.trace(_TwoHeads(True).eval(), (x,), strict=False)  # type: ignore[no-untyped-call]
        torch.jit.save(as_dict, str(files["dict.pt"]))
        as_tuple = torch.jit.trace(_TwoHeads(False).eval(), (x,))  # type: ignore[no-untyped-call]
        torch.jit.save(as_tuple, str(files["tuple.pt"]))
    return files


def reference_outputs(file: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch's answer for a file whose forward() returns a dict of tensors."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        module = torch.export.load(str(file)).module()
        out: dict[str, torch.Tensor] = module(*(torch.from_numpy(v) for v in feeds.values()))
    return {name: tensor.numpy() for name, tensor in out.items()}


class TorchProcess:
    """Runs this module's functions in one spawned child process, reused between tests."""

    def __init__(self) -> None:
        self._pool = self._start()

    @staticmethod
    def _start() -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return self._pool.submit(function, *args, **kwargs).result(timeout=600)
        except concurrent.futures.process.BrokenProcessPool:
            self._pool = self._start()  # the next test gets a fresh child
            raise
        except TimeoutError:
            self.close()  # a hung child must not hold the session's teardown too
            self._pool = self._start()
            raise

    def close(self) -> None:
        for process in list(getattr(self._pool, "_processes", {}).values()):
            process.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)
