"""Convert a vetted Keras file to ONNX in a child process, then prove the ONNX computes what Keras computes.

The child (`keras_export.py`) is the only process that imports Keras; it gets a scratch KERAS_HOME and the file
and writes ONNX plus Keras' own predictions. Here onnxruntime runs those inputs (the export's shapes and a batch
size and sequence length the export never saw) and the model is accepted within TOLERANCE of Keras.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.errors import InvalidContent
from app.formats import keras_file
from app.formats.torch_check import TOLERANCE, Conversion, Progress, first_line

_CHILD = Path(__file__).with_name("keras_export.py")
_REFUSED = 3
TIMEOUT_SECONDS = 3600


def convert(source: Path, kind: str, output: Path, *, label: str, samples: Path | None,
            progress: Progress) -> Conversion:
    """`samples`: an .npz keyed by the Keras input names, whose rows the check uses instead of random ones."""
    progress(0.05, "exporting the Keras model")
    with tempfile.TemporaryDirectory(prefix="keras-", dir=output.parent) as scratch_name:
        scratch = Path(scratch_name)
        check_path = scratch / "check.npz"
        # Keras picks its reader by the file's extension; the store names files by content hash.
        named = scratch / f"model{keras_file.SUFFIXES[kind]}"
        named.symlink_to(source.resolve())
        command = [sys.executable, "-I", str(_CHILD), "--source", str(named), "--output", str(output),
                   "--check", str(check_path)]
        if samples is not None:
            command += ["--samples", str(samples)]
        environment = {key: value for key, value in os.environ.items() if not key.startswith("KERAS")}
        environment.update(KERAS_BACKEND="torch", KERAS_HOME=str(scratch / "keras-home"),
                           TF_CPP_MIN_LOG_LEVEL="3", ORT_DISABLE_TELEMETRY="1")
        try:
            done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                                  stdin=subprocess.DEVNULL, cwd=scratch, check=False)
        except subprocess.TimeoutExpired:
            raise InvalidContent(f"{label}: the Keras export took over {TIMEOUT_SECONDS} s") from None
        if done.returncode != 0:
            lines = [line for line in (done.stderr or "").splitlines() if line.strip()]
            reason = lines[-1][:400] if lines else f"exit status {done.returncode}"
            if done.returncode == _REFUSED:
                raise InvalidContent(f"{label} cannot be converted: {reason}", code="unsupported_layer")
            raise InvalidContent(f"{label}: the Keras export failed: {reason}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        progress(0.7, "comparing the ONNX model with Keras")
        with np.load(check_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    try:
        session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InvalidContent(f"the ONNX model converted from {label} does not load: {first_line(exc)}") from None
    worst, rows = 0.0, 0
    for case in summary["cases"]:
        feeds = {name: arrays[f"{case}.in.{name}"] for name in summary["inputs"]}
        try:
            got = session.run(summary["outputs"], feeds)
        except Exception as exc:
            raise InvalidContent(f"the ONNX model converted from {label} fails on the {case} inputs: "
                                 f"{first_line(exc)}") from None
        for name, value in zip(summary["outputs"], got, strict=True):
            expected = arrays[f"{case}.out.{name}"]
            if value.shape != expected.shape:
                raise InvalidContent(f"the ONNX model converted from {label} gives output {name!r} of shape "
                                     f"{list(value.shape)} where Keras gives {list(expected.shape)}")
            error = float(np.max(np.abs(value.astype(np.float64) - expected))) if value.size else 0.0
            scale = float(np.max(np.abs(expected))) if expected.size else 0.0
            if not error <= TOLERANCE * max(1.0, scale):
                raise InvalidContent(f"the ONNX model converted from {label} differs from Keras by {error:.3g} on "
                                     f"output {name!r} ({case} inputs); it was not accepted")
            worst = max(worst, error)
        rows += next(iter(feeds.values())).shape[0]
    return Conversion(max_abs_error=worst, rows_checked=rows, dynamic_axes=summary["dynamic_axes"],
                      exporter=f"keras {summary['keras_version']} (torch backend) -> torch.export -> ONNX")
