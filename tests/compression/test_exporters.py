"""Every preset on models written by the real exporters: success with an honest report, or a refusal at submission.

The models are no one's here: Hugging Face encoders through torch.onnx's TorchScript and dynamo exporters, BERT
after onnxruntime's optimizer, CNNs and LSTMs through both exporters, a Keras CNN through tf2onnx, and PaddleOCR's
orientation model through Paddle2ONNX (see tests/exports.py). Runs are spread over two processes.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.compression import preflight
from app.compression.config import AUTO, parse_recipe
from tests.exports import EXPORTS, TF2ONNX_CNN, exporter_models, paddle_models, text_images
from tests.helpers import npz_bytes

PRESETS = ("optimize", "int8-dynamic", "int8-static", "fp16", "int4-weight", "prune-50", "shrink-50", AUTO)
# Inputs for models that come without samples: (input name, shape of one sample); PaddleOCR's see text.
_DRAWN = {"tf2onnx_cnn": ("image", (32, 32, 3)), "paddle-cls": ("x", (3, 48, 192))}
_SAMPLES = 32
# Latencies are timed briefly: these models test graph handling, their speed figures mean nothing.
_TIMING = 0.05


def _models() -> dict[str, Path]:
    folder = exporter_models()
    models = {name: folder / f"{name}.onnx" for name in EXPORTS}
    models["tf2onnx_cnn"] = TF2ONNX_CNN
    paddle = paddle_models()
    for kind in ("cls",):  # the detector (Resize, opset 12) runs in benchmarks/compression.py: too slow here
        if kind in paddle:
            models[f"paddle-{kind}"] = paddle[kind]
    return models


def _data_file(name: str, model: Path, folder: Path) -> Path:
    samples = model.parent / f"{name}.samples.npz" if name in EXPORTS else folder / f"{name}.npz"
    if name in _DRAWN:
        input_name, shape = _DRAWN[name]
        images = text_images(_SAMPLES, shape[1], shape[2]) if name.startswith("paddle") else \
            np.random.default_rng(0).standard_normal((_SAMPLES, *shape)).astype(np.float32)
        samples.write_bytes(npz_bytes(**{input_name: images}))
    return samples


def _run(name: str, model: str, samples: str, preset: str, out: str) -> dict[str, Any]:
    """One compression in a worker process; returns the outcome as plain data."""
    from app.compression import Budget, CompressionError, from_npz, run_recipe, search
    from app.compression.graph import io_info

    path, budget = Path(model), Budget(metric="cosine", max_drop=0.01)
    data = from_npz(Path(samples), io_info(path)[0])
    output = Path(out) / f"{name}-{preset}.onnx"  # never beside the cached exports
    try:
        if preset == AUTO:
            found = search(original=path, output=output, data=data, budget=budget, timing_seconds=_TIMING)
            report = found.report
            errors = [c["error"] for c in found.candidates if c.get("error")]
        else:
            report, errors = run_recipe(original=path, output=output, recipe=parse_recipe(preset), data=data,
                                        budget=budget, timing_seconds=_TIMING).report, []
    except CompressionError as exc:
        return {"error": f"{type(exc).__name__}: {exc.describe()}", "report": None}
    except Exception as exc:  # what must never happen: reported as such
        return {"error": f"UNEXPECTED {type(exc).__name__}: {exc}", "report": None}
    return {"error": None, "candidate_errors": errors, "report": _summary(report)}


def _summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {key: report[key] for key in ("size_ratio", "speedup", "fidelity", "within_budget", "auto")
            if key in report}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    folder = tmp_path_factory.mktemp("matrix")
    models = _models()
    outcomes: dict[tuple[str, str], dict[str, Any]] = {}
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for name, model in models.items():
            samples = _data_file(name, model, folder)
            summary = preflight.profile(model)
            for preset in PRESETS:
                recipe = None if preset == AUTO else parse_recipe(preset)
                refused = preflight.check(summary, recipe, has_dataset=True)
                if refused:
                    outcomes[(name, preset)] = {"refused": refused}
                    continue
                futures[(name, preset)] = pool.submit(_run, name, str(model), str(samples), preset, str(folder))
        for key, future in futures.items():
            outcomes[key] = future.result()
    return outcomes


def _names() -> list[str]:
    return [*EXPORTS, "tf2onnx_cnn", *(["paddle-cls"] if "cls" in paddle_models() else [])]


@pytest.mark.parametrize("name", _names())
def test_every_preset_succeeds_or_is_refused_at_submission(
    name: str, matrix: dict[tuple[str, str], dict[str, Any]],
) -> None:
    failures = {}
    for preset in PRESETS:
        outcome = matrix[(name, preset)]
        if "refused" in outcome:
            assert all(len(reason) > 20 for reason in outcome["refused"]), outcome
            continue
        if outcome["error"] is not None:
            failures[preset] = outcome["error"]
            continue
        report = outcome["report"]
        assert 0 < report["size_ratio"] < 1.6 and report["speedup"]["batch_1"] > 0, (preset, report)
        assert -1.0 <= report["fidelity"]["cosine_mean"] <= 1.0 + 1e-6 and isinstance(report["within_budget"], bool)
        for error in outcome["candidate_errors"]:  # auto's dropped candidates say why, never an accident
            assert "UNEXPECTED" not in error and "cannot handle this model as it is" not in error, (preset, error)
    assert failures == {}
    # float models: the three everyday quantizations apply, and one INT8 variant keeps the outputs
    for preset in ("fp16", "int8-dynamic", "int8-static"):
        assert matrix[(name, preset)].get("error", "refused") is None, (preset, matrix[(name, preset)])
    cosines = [matrix[(name, p)]["report"]["fidelity"]["cosine_mean"] for p in ("int8-dynamic", "int8-static")]
    assert max(cosines) >= 0.99, cosines
