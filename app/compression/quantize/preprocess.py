"""onnxruntime's quantization pre-processing, run where its temporary files cannot reach the process cwd.

`quant_pre_process` writes `<uuid>.data` and `sym_shape_infer_temp.onnx` into the current directory when
symbolic shape inference fails (it does on most transformer-optimized graphs). Changing the cwd in-process
would race with every other thread, so the tool runs in a child process whose cwd and TMPDIR are the step's
private work folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CHILD = Path(__file__).with_name("preprocess_child.py")
_POLL_SECONDS = 0.25


class PreprocessFailed(Exception):
    pass


def preprocess(model: Path, output: Path, workdir: Path, progress: Callable[[float, str], None]) -> dict[str, Any]:
    """Shape inference and basic optimization before quantizing; returns what was done for the notes.

    Falls back to `skip_symbolic_shape=True` when symbolic shape inference fails, and to the model as it is
    when pre-processing fails altogether (the quantizers run without it, with less shape information).
    """
    try:
        _run_child(model, output, workdir, [], progress)
        return {"preprocessing": "quant_pre_process", "symbolic_shape_inference": True}
    except PreprocessFailed as first:
        reason = str(first)
    try:
        _run_child(model, output, workdir, ["--skip-symbolic-shape"], progress)
        return {"preprocessing": "quant_pre_process", "symbolic_shape_inference": False,
                "preprocessing_fallback": f"symbolic shape inference failed ({reason}); retried without it"}
    except PreprocessFailed as second:
        output.write_bytes(model.read_bytes())
        return {"preprocessing": None, "symbolic_shape_inference": False,
                "preprocessing_fallback": f"quant_pre_process failed ({second}); quantized the model as it is"}


def _run_child(model: Path, output: Path, workdir: Path, flags: list[str],
               progress: Callable[[float, str], None]) -> None:
    output.unlink(missing_ok=True)  # a failed first try must not pass for a result
    scratch = Path(tempfile.mkdtemp(prefix="preprocess-", dir=workdir))
    env = {**os.environ, "TMPDIR": str(scratch), "TEMP": str(scratch), "TMP": str(scratch)}
    log = scratch / "stderr.txt"
    # -P: the script's folder (app/compression/quantize) must not shadow top-level modules in the child.
    command = [sys.executable, "-P", str(_CHILD), str(model.resolve()), str(output.resolve()), *flags]
    with log.open("wb") as stderr:
        child = subprocess.Popen(command, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            while child.poll() is None:
                progress(0.05, "pre-processing")  # raises Cancelled: the finally below stops the child
                try:
                    child.wait(timeout=_POLL_SECONDS)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if child.returncode != 0 or not output.exists():
        raise PreprocessFailed(_last_error(log.read_text(errors="replace")))


def _last_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or ["no error output"])[-1][:300]
